# Copyright 2026 The omnilmm-hf authors. Licensed under the Apache License, Version 2.0.
"""OmniLMM processor: `<image>` / `<video>` placeholders -> image spans, tokenised, padded, safely truncated."""

import os
import re

import numpy as np

from transformers import image_utils, processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin
from transformers.utils import logging

from .image_processing_omnilmm import OmniLMMImageProcessorKwargs


logger = logging.get_logger(__name__)
SPAN_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")
MAX_SLICED_VIDEO_FRAMES = 16
MM_FLAGS = ("return_mm_token_type_ids", "return_text_replacement_offsets")  # 5.17: text kwargs
VISUAL_KEYS = ("pixel_values", "image_sizes", "slice_grids")
SLICE_SETTINGS = ("slice_mode", "max_slice_nums", "scale_resolution", "patch_size", "never_split")
_UNMARKED = getattr(processing_utils, "_UNMARKED", "")  # a placeholder marked as user text is not one


class OmniLMMProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: OmniLMMImageProcessorKwargs
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left", "return_tensors": "pt"}}


def _is_array(value):
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def _depth(x):  # 0: an image, 1: a list of images (a video), 2: a list of those, ...
    if _is_array(x) or not isinstance(x, (list, tuple)):
        return int(_is_array(x) and x.ndim == 4)
    first = next((y for y in x if y is not None), None)
    return 1 + (int(len(x) > 0) if first is None else _depth(first))


def _per_prompt(items, leaf):
    """(a flat list, False) or (a list per prompt of lists, True) of images (`leaf=0`) or videos (`leaf=1`)."""
    depth = 0 if isinstance(items, (str, os.PathLike)) else _depth(items)
    if depth <= leaf and not (isinstance(items, (list, tuple)) and not items):
        return [items], False
    return (list(items), False) if depth <= leaf + 1 else ([list(x or []) for x in items], True)


def _frames(video):
    if isinstance(video, (str, os.PathLike)):
        raise TypeError(f"Videos are given as their frames (a list of images or a 4-D array); video files such as "
                        f"{os.fspath(video)!r} are not decoded here.")
    if not (_is_array(video) and video.ndim == 4 or isinstance(video, (list, tuple))) or not len(video):
        raise ValueError("A video must be a non-empty list of frames or a 4-D array (frames first).")
    return list(video)


def _fetch(image):  # http(s) URLs are fetched here; the image processor reads files only
    return image_utils.load_image(image) if isinstance(image, str) and image.startswith(("http:", "https:")) else image


def _distribute(items, counts, what, placeholder):
    """`items` (None, flat in placeholder order, or per prompt) as one list per prompt, checked against `counts`."""
    rule = f"the number of {placeholder} placeholders must equal the number of {what}."
    items, nested = ([], False) if items is None else _per_prompt(items, what == "videos")
    if nested and len(items) != len(counts):
        raise ValueError(f"`{what}` has {len(items)} lists (one per prompt) but there are {len(counts)} prompts.")
    for i, (sample, count) in enumerate(zip(items, counts) if nested else ()):
        if len(sample) != count:
            raise ValueError(f"Prompt {i} has {count} {placeholder} placeholder(s) but {len(sample)} {what} were "
                             f"given for it; {rule}")
    if not nested and len(items) != sum(counts):
        raise ValueError(f"The prompts have {sum(counts)} {placeholder} placeholder(s) ({', '.join(map(str, counts))} "
                         f"per prompt) but {len(items) or 'no'} {what} were given; {rule}")
    starts = np.cumsum([0, *counts])
    return items if nested else [list(items[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def _source_span(span, replacements):
    """A `(start, end)` of the expanded text in the text before expansion (in an image's spans: its placeholder)."""
    start, end = span
    for (a, b), (new_a, new_b) in ((r["span"], r["new_span"]) for r in reversed(replacements)):
        if start >= new_b:
            return start - new_b + b, end - new_b + b
        if start >= new_a:
            return a, b
    return start, end


class OmniLMMProcessor(ProcessorMixin):
    r"""An `OmniLMMImageProcessor` and a (Mistral v0.1) tokenizer with `<im_patch>`, `<im_start>`, `<im_end>`.
    `num_query` (256; 64 for MiniCPM-V-style slicing models) is the `<im_patch>` count per span (the model's)."""

    valid_processor_kwargs = OmniLMMProcessorKwargs
    text_kwargs = OmniLMMProcessorKwargs._defaults["text_kwargs"]
    skip_tensor_conversion = ["video_metadata", "text_replacement_offsets", *VISUAL_KEYS]  # ragged lists
    image_token, video_token = "<image>", "<video>"
    model_input_names = ["input_ids", "attention_mask", "pixel_values"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_query=256, **kwargs):
        if kwargs:
            logger.warning_once(f"OmniLMMProcessor ignores the unknown arguments {sorted(kwargs)}.")
        if isinstance(num_query, bool) or not isinstance(num_query, int) or num_query < 1:
            raise ValueError(f"num_query must be a positive integer, got {num_query!r}")
        self.num_query = num_query
        chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        ids = [self.tokenizer.convert_tokens_to_ids(token) for token in SPAN_TOKENS]
        if any(i is None or i == self.tokenizer.unk_token_id for i in ids):
            raise ValueError(f"The tokenizer lacks one of {SPAN_TOKENS}; OmniLMM needs them as added tokens.")
        self.im_patch_token_id, self.im_start_token_id, self.im_end_token_id = self.image_token_ids = ids

    def image_placeholder(self, grid=None) -> str:
        """The text of one image: its source span, then per row of the `(cols, rows)` grid `"\\n"` + the row."""
        span = SPAN_TOKENS[1] + SPAN_TOKENS[0] * self.num_query + SPAN_TOKENS[2]
        return span if grid is None else span + ("\n" + span * grid[0]) * grid[1]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        grids = image_inputs["slice_grids"]  # flat, or per prompt as the image processor returns them
        if not all(g is None or len(g) == 2 and isinstance(g[0], (int, np.integer)) for g in grids):
            grids = [g for sample in grids for g in sample]
        return self.image_placeholder(grids[image_idx])

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return "\n".join(self.image_placeholder(g) for g in video_inputs["slice_grids"][video_idx])

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Image-span tokens and views per image of `image_sizes` (`(height, width)`, as transformers' callers
        give them), from the slicing geometry alone; `kwargs` as for `__call__` (e.g. `max_slice_nums`)."""
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge(kwargs)["images_kwargs"]
        overrides = {k: images_kwargs[k] for k in SLICE_SETTINGS if images_kwargs.get(k) is not None}
        grids = [self.image_processor.slice_grid((int(w), int(h)), **overrides) for h, w in image_sizes]
        views = [1 + (g[0] * g[1] if g else 0) for g in grids]
        return MultiModalData(num_image_tokens=[n * (self.num_query + 2) for n in views], num_image_patches=views)

    def _merge(self, kwargs):
        for value in (kwargs.get("max_length"), (kwargs.get("text_kwargs") or {}).get("max_length")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"max_length must be a positive integer, got {value!r}.")
        return self._merge_kwargs(OmniLMMProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)

    def _prompts(self, text):
        """The prompts as a list, and per prompt the kinds of its placeholders in reading order."""
        if isinstance(text, str) or isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            texts = [text] if isinstance(text, str) else list(text)
            pattern = f"{_UNMARKED}({re.escape(self.image_token)}|{re.escape(self.video_token)})"
            return texts, [[m.group(1) for m in re.finditer(pattern, sample)] for sample in texts]
        if isinstance(text, (list, tuple)) and not text:
            raise ValueError("`text` is an empty list.")
        kinds = f" of {sorted({type(t).__name__ for t in text})}" if isinstance(text, (list, tuple)) else ""
        raise TypeError(f"`text` must be a string or a list of strings, got {type(text).__name__}{kinds}")

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """`images`: one image (PIL, array, tensor, path or http(s) URL), a flat list (given to the prompts in the
        order of their `<image>` placeholders) or a list per prompt of lists; `videos` likewise, a video being its
        frames. `kwargs` (flat or as `text_kwargs=` / `images_kwargs=`): tokenizer and image options. Returns
        `input_ids`, `attention_mask` (left padded) and `pixel_values` (per prompt, the `(3, H, W)` views in span
        order), `image_sizes` (`(w, h)`), `slice_grids` (`(cols, rows)` or `None`)."""
        if kwargs.pop("audio", None) is not None:
            raise ValueError("OmniLMM does not take audio.")
        if text is None and (images is None or videos is not None):
            raise ValueError("OmniLMMProcessor needs `text` and/or `images` (videos: a prompt with <video> in it).")
        merged = self._merge(kwargs)
        if text is None:  # image features only: a flat list is one image per sample
            flat, nested = _per_prompt(images, 0)
            kinds = [[self.image_token] * (len(x) if nested else 1) for x in flat]
            return BatchFeature(self._process_visuals(kinds, images, None, merged["images_kwargs"])[0])
        texts, kinds = self._prompts(text)
        visuals, grids = self._process_visuals(kinds, images, videos, merged["images_kwargs"])
        out = self._text_inputs(texts, kinds, grids, merged)
        out.update(visuals if images is not None or videos is not None else {})
        return out

    def _process_visuals(self, kinds, images, videos, images_kwargs):
        """Per prompt, the image processor's outputs in span order and, per placeholder, its slice grid(s)."""
        left = {}
        for token, items, what in ((self.image_token, images, "images"), (self.video_token, videos, "videos")):
            left[token] = [iter(x) for x in _distribute(items, [k.count(token) for k in kinds], what, token)]
        visuals, grids = {key: [[] for _ in kinds] for key in VISUAL_KEYS}, [[] for _ in kinds]
        for s, sample_kinds in enumerate(kinds):
            for kind in sample_kinds:
                frames = [next(left[kind][s])] if kind == self.image_token else _frames(next(left[kind][s]))
                few = {"max_slice_nums": 1} if len(frames) > MAX_SLICED_VIDEO_FRAMES else {}
                out = self.image_processor([[_fetch(frame) for frame in frames]], **{**images_kwargs, **few})
                for key in VISUAL_KEYS:
                    visuals[key][s] += out[key][0]
                grids[s].append(out["slice_grids"][0][0] if kind == self.image_token else out["slice_grids"][0])
        return visuals, grids

    def expand_and_tokenize(self, text, slice_grids=None, **kwargs) -> BatchFeature:
        """The text half of `__call__`, without pixels: expand `text` and tokenise it exactly as `__call__` does
        (same ids, padding, truncation guard, errors). `slice_grids`: per prompt, per placeholder in reading order,
        an `<image>`'s `(cols, rows)` grid or `None` (unsliced), a `<video>`'s list of them; `None`: no images."""
        texts, kinds = self._prompts(text)
        return self._text_inputs(texts, kinds, [[] for _ in texts] if slice_grids is None else slice_grids,
                                 self._merge(kwargs))

    def _text_inputs(self, texts, kinds, slice_grids, merged):
        if len(slice_grids) != len(texts) or any(len(g) != len(k) for g, k in zip(slice_grids, kinds)):
            raise ValueError(f"`slice_grids` must hold per prompt one entry per <image>/<video> placeholder: the "
                             f"prompts have {[len(k) for k in kinds]}, `slice_grids` {[len(g) for g in slice_grids]}.")
        pairs = [pair for sample in zip(kinds, slice_grids) for pair in zip(*sample)]  # (placeholder, grid(s))
        image_inputs, video_inputs = ({"slice_grids": [g for k, g in pairs if k == kind]}
                                      for kind in (self.image_token, self.video_token))
        expanded, offsets = self.get_text_with_replacements(
            texts, [self.replace_image_token(image_inputs, i) for i in range(len(image_inputs["slice_grids"]))],
            [self.replace_video_token(video_inputs, i) for i in range(len(video_inputs["slice_grids"]))])
        spans = [sum(r["replacement"].count(SPAN_TOKENS[1]) for r in row) for row in offsets]  # views per prompt
        text_kwargs = merged["text_kwargs"]
        return_mm, return_offsets = (text_kwargs.pop(key, merged.get(key, False)) for key in MM_FLAGS)
        data = self._tokenize(expanded, spans, text_kwargs)
        if return_offsets:
            data["text_replacement_offsets"] = offsets
        elif "offset_mapping" in data:  # into the caller's text (given the replacements, 5.24 maps them itself)
            rows = zip(data["offset_mapping"], offsets)
            data["offset_mapping"] = [[_source_span(o, r) for o in row] for row, r in rows]
        if return_mm:
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"])
        return BatchFeature(data, tensor_type=text_kwargs.get("return_tensors"),
                            skip_tensor_conversion=self.skip_tensor_conversion)

    def _tokenize(self, texts, spans, text_kwargs):
        kw = {"padding": True, "verbose": True, "add_special_tokens": True, **text_kwargs}
        padding, truncation, max_length, verbose, add_special, return_mask, return_length, with_offsets, _ = (
            kw.pop(key, None) for key in ("padding", "truncation", "max_length", "verbose", "add_special_tokens",
                                          "return_attention_mask", "return_length", "return_offsets_mapping",
                                          "return_tensors"))  # tensors: after padding, below
        pad_args = {key: kw.pop(key, None) for key in ("pad_to_multiple_of", "padding_side")}
        encoded = self.tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=bool(with_offsets),
                                 **kw)
        bos, rows = self.tokenizer.bos_token_id, []
        for i, ids in enumerate(encoded["input_ids"]):
            ids, offsets = list(ids), list(encoded["offset_mapping"][i]) if with_offsets else None
            if add_special and bos is not None and ids[:2] == [bos, bos]:  # the prompt starts with BOS: never two
                ids, offsets = ids[1:], offsets and offsets[1:]
            rows.append(self._check_and_truncate(i, ids, offsets, truncation, max_length, spans[i]))
        pad_to = max_length if getattr(padding, "value", padding) == "max_length" else None
        padded = self.tokenizer.pad({"input_ids": [ids for ids, _ in rows]}, padding=padding, verbose=verbose,
                                    max_length=pad_to, return_attention_mask=True, **pad_args)
        data = {"input_ids": padded["input_ids"]}
        if return_mask is not False:
            data["attention_mask"] = padded["attention_mask"]
        if with_offsets:
            left = (pad_args["padding_side"] or self.tokenizer.padding_side) == "left"
            pads = [[(0, 0)] * (len(ids) - len(o)) for ids, (_, o) in zip(padded["input_ids"], rows)]
            data["offset_mapping"] = [p + o if left else o + p for p, (_, o) in zip(pads, rows)]
        if return_length:
            data["length"] = [len(ids) for ids, _ in rows]
        return data

    def _check_and_truncate(self, index, ids, offsets, truncation, max_length, n_spans):
        """Check the image tokens of a prompt, then truncate it to `max_length` (never through an image span)."""
        found = [ids.count(token) for token in self.image_token_ids]  # <im_patch>, <im_start>, <im_end>
        if found != [n_spans * self.num_query, n_spans, n_spans]:
            raise ValueError(f"Prompt {index} has {found[1]} <im_start>, {found[2]} <im_end> and {found[0]} "
                             f"<im_patch> tokens after expansion, but its images need {n_spans} span(s) of "
                             f"{self.num_query} patches: write images as <image> placeholders, not as literal image "
                             "tokens.")
        max_length = self.tokenizer.model_max_length if max_length is None else max_length
        if truncation in (None, False, "do_not_truncate") or len(ids) <= max_length:
            return ids, offsets
        side = getattr(self.tokenizer, "truncation_side", "right")
        keep = slice(0, max_length) if side == "right" else slice(len(ids) - max_length, len(ids))
        image = [p for p, token in enumerate(ids) if token in self.image_token_ids]
        if image and (image[0] < keep.start or image[-1] >= keep.stop):
            raise ValueError(f"Prompt {index} is {len(ids)} tokens long, {len(image)} of them in {n_spans} image "
                             f"span(s) of {self.num_query + 2} tokens; truncating it to max_length={max_length} (from "
                             f"the {side}) would cut through the image spans. The images alone need {len(image)} "
                             "tokens: raise max_length, shorten the text, or use fewer slices (max_slice_nums).")
        return ids[keep], offsets[keep] if offsets is not None else None

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """`generate`'s output as a list of strings (a batch) or a string (one sequence), image spans dropped."""
        sequences = getattr(generated_outputs, "sequences", generated_outputs)
        one = (sequences.ndim == 1) if _is_array(sequences) else not sequences or isinstance(sequences[0], int)
        decode = self.tokenizer.decode if one else self.tokenizer.batch_decode
        return decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["OmniLMMProcessor"]
