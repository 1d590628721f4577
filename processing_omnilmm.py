# Copyright 2026 The omnilmm-hf authors. Licensed under the Apache License, Version 2.0.
"""OmniLMM processor: `<image>` / `<video>` placeholders -> image spans, tokenised, padded, safely truncated."""

import os
import re

import numpy as np

from transformers import image_utils, processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.tokenization_utils_base import TextInput
from transformers.video_utils import VideoInput
from transformers.utils import logging

from .image_processing_omnilmm import OmniLMMImageProcessorKwargs, _is_count, num_views
from .video_processing_omnilmm import OmniLMMVideoProcessor, OmniLMMVideoProcessorKwargs


logger = logging.get_logger(__name__)
SPAN_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")
NEWLINE_TOKENS = 2  # "\n" after a span token is "▁" + "\n" (frames and rows of tiles are joined by it)
MM_FLAGS = ("return_mm_token_type_ids", "return_text_replacement_offsets")  # 5.17: text kwargs
MM_TYPES = {"image": 1, "video": 2}  # mm_token_type_ids of a span's tokens
VISUAL_KEYS = ("pixel_values", "image_sizes", "slice_grids")
SLICE_SETTINGS = ("slice_mode", "max_slice_nums", "scale_resolution", "patch_size", "never_split")
_UNMARKED = getattr(processing_utils, "_UNMARKED", "")  # a placeholder marked as user text is not one


class OmniLMMProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: OmniLMMImageProcessorKwargs
    videos_kwargs: OmniLMMVideoProcessorKwargs
    _defaults = {"text_kwargs": {"padding": True, "padding_side": "left", "return_tensors": "pt"}}


def _is_array(value):
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def _depth(x, leaf):  # 0: an image, 1: a video (its frames, a 4-D array, or a file: `leaf`), 2: a list of those, ...
    if isinstance(x, (str, os.PathLike, bytes)):  # a file: an image (`leaf=0`) or a video (`leaf=1`)
        return leaf
    if _is_array(x) or not isinstance(x, (list, tuple)):
        return int(_is_array(x) and x.ndim == 4)
    first = next((y for y in x if y is not None and not (isinstance(y, (list, tuple)) and not y)), None)
    return 1 + (int(len(x) > 0) if first is None else _depth(first, leaf))


def _per_prompt(items, leaf):
    """(a flat list, False) or (a list per prompt of lists, True) of images (`leaf=0`) or videos (`leaf=1`)."""
    depth = _depth(items, leaf)
    if depth <= leaf and not (isinstance(items, (list, tuple)) and not items):
        return [items], False
    return (list(items), False) if depth <= leaf + 1 else ([list(x or []) for x in items], True)


def _fetch(image):  # http(s) URLs are fetched here; the image processor reads files only
    return image_utils.load_image(image) if isinstance(image, str) and image.startswith(("http:", "https:")) else image


def _distribute(items, counts, what, placeholder):
    """`items` (None, flat in placeholder order, or per prompt) as one list per prompt, checked against `counts`."""
    rule = f"the number of {placeholder} tokens in the prompts should be the same as the number of {what} passed."
    items, nested = ([], False) if items is None else _per_prompt(items, what == "videos")
    if nested and len(items) != len(counts):
        raise ValueError(f"`{what}` has {len(items)} lists (one per prompt) but there are {len(counts)} prompts: "
                         f"{rule}")
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
    model_input_names = ["input_ids", "attention_mask", *VISUAL_KEYS]

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, num_query=256,
                 max_position_embeddings=None, **kwargs):
        """`video_processor`: by default one with the image processor's settings. `max_position_embeddings`: the
        model's context (None: unknown); videos are sampled to fit in what a prompt leaves of it."""
        if kwargs:
            logger.warning_once(f"OmniLMMProcessor ignores the unknown arguments {sorted(kwargs)}.")
        for name, value in (("num_query", num_query), ("max_position_embeddings", max_position_embeddings)):
            if (value is not None or name == "num_query") and not _is_count(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.num_query, self.max_position_embeddings = num_query, max_position_embeddings
        if video_processor is None and image_processor is not None:
            video_processor = OmniLMMVideoProcessor.from_image_processor(image_processor)
        chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template)
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

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        """Image-span tokens and views per image of `image_sizes` (`(height, width)`, as transformers' callers give
        them) and per video of `video_sizes` (`(num_frames, height, width)`, frames as sampled), from the slicing
        geometry alone; `kwargs` as for `__call__` (e.g. `max_slice_nums`)."""
        merged, data = self._merge(kwargs), {}
        if image_sizes is not None:
            slicing = {key: merged["images_kwargs"].get(key) for key in SLICE_SETTINGS}  # (None: the processor's)
            views = [num_views(self.image_processor.slice_grid((int(w), int(h)), **slicing)) for h, w in image_sizes]
            data.update(num_image_tokens=[n * (self.num_query + 2) for n in views], num_image_patches=views)
        if video_sizes is not None:
            slicing = {key: merged["videos_kwargs"].get(key) for key in (*SLICE_SETTINGS, "max_sliced_frames")}
            grids = [self.video_processor.frame_grid(int(n), (int(w), int(h)), **slicing) for n, h, w in video_sizes]
            views = [int(n) * num_views(grid) for (n, _, _), grid in zip(video_sizes, grids)]
            data["num_video_tokens"] = [n * (self.num_query + 2) for n in views]
        return MultiModalData(**data)

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

    def __call__(self, images: ImageInput | None = None, text: TextInput | list[TextInput] | None = None,
                 videos: VideoInput | None = None, **kwargs: Unpack[OmniLMMProcessorKwargs]) -> BatchFeature:
        """`images`: one image (PIL, array, tensor, path or http(s) URL), a flat list (given to the prompts in the
        order of their `<image>` placeholders) or a list per prompt of lists; `videos` likewise, a video being a file
        (path, URL, bytes) or its frames. `kwargs` (flat or as `text_kwargs=` / `images_kwargs=` / `videos_kwargs=`):
        tokenizer, image and video options. Returns `input_ids`, `attention_mask` (left padded) and `pixel_values`
        (per prompt, the `(3, H, W)` views of its images and video frames in span order), `image_sizes` (`(w, h)`),
        `slice_grids` (`(cols, rows)` or `None`)."""
        if kwargs.pop("audio", None) is not None:
            raise ValueError("OmniLMM does not take audio.")
        if text is None and (images is None or videos is not None):
            raise ValueError("OmniLMMProcessor needs `text` and/or `images` (videos: a prompt with <video> in it).")
        merged = self._merge(kwargs)
        if text is None:  # image features only: a flat list is one image per sample
            flat, nested = _per_prompt(images, 0)
            kinds = [[self.image_token] * (len(x) if nested else 1) for x in flat]
            return BatchFeature(self._process_visuals([""] * len(kinds), kinds, images, None, merged)[0])
        texts, kinds = self._prompts(text)
        visuals, grids = self._process_visuals(texts, kinds, images, videos, merged)
        out = self._text_inputs(texts, kinds, grids, merged)
        out.update(visuals if images is not None or videos is not None else {})
        return out

    def _process_visuals(self, texts, kinds, images, videos, merged):
        """Per prompt, the views of its images and video frames in span order (with `image_sizes`, `slice_grids`)
        and, per placeholder, its slice grid (an image) or its frames' grids (a video). Images go first: what they
        and the text take of the context decides how many frames a prompt's videos may have."""
        given = {}
        for token, items, what in ((self.image_token, images, "images"), (self.video_token, videos, "videos")):
            given[token] = [iter(x) for x in _distribute(items, [k.count(token) for k in kinds], what, token)]
        outputs = [[None] * len(k) for k in kinds]  # per prompt, per placeholder: (views, sizes, grids, grid(s))
        for s, i in ((s, i) for s, k in enumerate(kinds) for i, kind in enumerate(k) if kind == self.image_token):
            out = self.image_processor([[_fetch(next(given[self.image_token][s]))]], **merged["images_kwargs"])
            outputs[s][i] = (*(out[key][0] for key in VISUAL_KEYS), out["slice_grids"][0][0])
        metadata, room = [], {}  # room: per prompt, the views each of its videos may take
        for s, i in ((s, i) for s, k in enumerate(kinds) for i, kind in enumerate(k) if kind == self.video_token):
            if s not in room:
                image_grids = [out[3] for kind, out in zip(kinds[s], outputs[s]) if kind == self.image_token]
                room[s] = self._video_views(texts[s], image_grids, merged)
            max_views = room[s]
            video = next(given[self.video_token][s])
            out = self.video_processor(video, **merged["videos_kwargs"], max_views=max_views)
            frames, height, width = out["video_sizes"][0]
            grids = out["video_slice_grids"][0]
            outputs[s][i] = (out["pixel_values_videos"][0], [(width, height)] * frames, grids, grids)
            metadata += out.get("video_metadata", [])
        visuals = {key: [[x for out in row for x in out[n]] for row in outputs] for n, key in enumerate(VISUAL_KEYS)}
        if merged["videos_kwargs"].get("return_metadata"):
            visuals["video_metadata"] = metadata  # one per video, in reading order
        return visuals, [[out[3] for out in row] for row in outputs]

    def video_views(self, text: str, image_grids=(), **kwargs) -> int | None:
        """The most views (one per unsliced frame; overview + tiles per sliced one) each `<video>` of the prompt
        `text` may take: what its text and images (`image_grids`, per `<image>` in order) leave of the context
        (`max_length` when truncating, else `max_position_embeddings`), shared equally. None: no limit known."""
        return self._video_views(text, list(image_grids), self._merge(kwargs))

    def _video_views(self, text, image_grids, merged):
        text_kwargs = merged["text_kwargs"]
        truncating = text_kwargs.get("truncation") not in (None, False, "do_not_truncate")
        context = text_kwargs.get("max_length") if truncating else None
        context = context or self.max_position_embeddings
        if context is None:
            return None
        pattern = f"{_UNMARKED}{re.escape(self.video_token)}"
        rest = self.expand_and_tokenize(re.sub(pattern, "", text), [list(image_grids)], return_tensors=None)
        room, videos = context - len(rest["input_ids"][0]), len(re.findall(pattern, text))
        views = room // videos // (self.num_query + 2 + NEWLINE_TOKENS)
        if views < 1:
            raise ValueError(f"The prompt's text and images take {context - room} of the {context} tokens of the "
                             f"context, which leaves no room for its {videos} video(s) (a frame takes at least "
                             f"{self.num_query + 2} tokens): shorten the prompt, or raise max_length.")
        requested = merged["videos_kwargs"].get("num_frames")
        if requested is not None and requested > views:
            raise ValueError(f"num_frames={requested} frames take at least {requested * (self.num_query + 2)} tokens, "
                             f"but the prompt leaves room for {views} frames per video ({room} of the {context} "
                             "tokens of the context): lower num_frames, or shorten the prompt.")
        return views

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
            span_types = [[MM_TYPES[r["type"]] for r in row for _ in range(r["replacement"].count(SPAN_TOKENS[1]))]
                          for row in offsets]
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(data["input_ids"], span_types)
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

    def create_mm_token_type_ids(self, input_ids, span_types=None) -> list[list[int]]:
        """Per token 0 (text), 1 (an image's span) or 2 (a video frame's span). Image and video spans are made of the
        same tokens: `span_types` (per prompt, per span in reading order) tells them apart; without it, all are 1."""
        rows = []
        for i, ids in enumerate(input_ids):
            ids = ids.tolist() if _is_array(ids) else list(ids)
            spans = iter(span_types[i] if span_types is not None else [])
            kind, types = 1, []
            for token in ids:
                if token == self.im_start_token_id:
                    kind = next(spans, 1)
                types.append(kind if token in self.image_token_ids else 0)
            rows.append(types)
        return rows

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """`generate`'s output as a list of strings (a batch) or a string (one sequence), image spans dropped."""
        sequences = getattr(generated_outputs, "sequences", generated_outputs)
        one = (sequences.ndim == 1) if _is_array(sequences) else not sequences or isinstance(sequences[0], int)
        decode = self.tokenizer.decode if one else self.tokenizer.batch_decode
        return decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["OmniLMMProcessor"]
