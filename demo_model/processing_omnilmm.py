# Copyright 2024 OpenBMB and The HuggingFace Inc. team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Processor for OmniLMM: expands ``<image>`` placeholders into image spans, tokenises, pads, truncates safely.

An *image span* is ``<im_start>`` + ``num_query`` x ``<im_patch>`` + ``<im_end>``; the model replaces the
``<im_patch>`` embeddings of each span by the resampler output of one image tensor. Each ``<image>``
placeholder of the text becomes

- square mode (OmniLMM-12B): one span;
- slice mode (MiniCPM-V): the span of the downscaled source image, then, for each row of tiles, ``"\\n"``
  followed by the row's spans.

``pixel_values`` is a list per sample of lists of ``(3, H, W)`` tensors, in span order (per image its source,
then its tiles row by row). ``<video>`` placeholders (from ``{"type": "video"}`` chat parts) take a video given
as a list of frames and become one ``<image>`` per frame, joined by ``"\\n"``; a video of more than 16 frames
is never sliced (``max_slice_nums=1``).
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from transformers import processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging


logger = logging.get_logger(__name__)

IM_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
MAX_SLICED_VIDEO_FRAMES = 16

# Control tokens that `apply_chat_template(..., sanitize_control_tokens=True)` marked as user text are wrapped in
# private markers; a marked placeholder is text, not an image (same rule as ProcessorMixin).
_UNMARKED = getattr(processing_utils, "_UNMARKED", "")
_MARKED_RE = getattr(processing_utils, "_MARKED_RE", None)

_TEXT_KWARGS = (
    "add_special_tokens",
    "pad_to_multiple_of",
    "padding_side",
    "return_attention_mask",
    "return_offsets_mapping",
    "return_text_replacement_offsets",
    "return_length",
    "sanitize_control_tokens",
    "split_special_tokens",
    "verbose",
)
_IMAGE_KWARGS = ("slice_mode", "max_slice_nums", "never_split")
# Accepted for compatibility with generic callers (pipelines, ProcessorMixin.apply_chat_template) and ignored.
_IGNORED_KWARGS = (
    "return_token_type_ids",
    "return_mm_token_type_ids",
    "return_overflowing_tokens",
    "return_special_tokens_mask",
    "stride",
    "is_split_into_words",
    "do_sample_frames",
    "fps",
    "num_frames",
    "return_metadata",
    "load_audio_from_video",
    "sampling_rate",
)


def _is_sequence(value):
    return isinstance(value, (list, tuple))


def _is_array(value):
    return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def _is_url(value):
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def _as_image_list(images):
    """A flat list of images, or a list per sample of lists (``None`` entries are empty samples)."""
    if _is_array(images) and getattr(images, "ndim", 0) == 4:
        return list(images), False  # (N, ...) = N images
    if not _is_sequence(images):
        return [images], False
    images = list(images)
    nested = [_is_sequence(x) or x is None for x in images]
    if images and all(nested):
        return [list(x) if x is not None else [] for x in images], True
    if any(_is_sequence(x) for x in images):
        raise ValueError(
            "`images` must be one image, a flat list of images (distributed over the prompts in the order of their "
            "<image> placeholders) or a list per prompt of lists of images, not a mix of images and lists."
        )
    return images, False


def _frames(video):
    """One video -> its list of frames."""
    if isinstance(video, (str, os.PathLike)):
        raise TypeError(
            f"Videos are given as their frames (a list of images or a (T, H, W, C) / (T, C, H, W) array); "
            f"video files such as {os.fspath(video)!r} are not decoded here."
        )
    if _is_array(video):
        if video.ndim != 4:
            raise ValueError(f"A video array must have 4 dimensions (frames first), got shape {tuple(video.shape)}")
        return list(video)
    if _is_sequence(video):
        return list(video)
    raise TypeError(f"A video must be a list of frames or a 4-D array, got {type(video).__name__}")


def _as_video_list(videos):
    """A flat list of videos (each a list of frames), or a list per sample of lists of videos."""
    if isinstance(videos, (str, os.PathLike)) or _is_array(videos):
        return [_frames(videos)], False
    if not _is_sequence(videos):
        raise TypeError(
            f"`videos` must be a video (list of frames or 4-D array) or a list of videos, got {type(videos).__name__}"
        )
    videos = list(videos)
    if not videos:
        return [], False

    def depth(x):
        # 0: a frame, 1: a video as a list of frames / a 4-D array, 2: a list of videos, ...
        if _is_array(x):
            return 1 if x.ndim == 4 else 0
        if _is_sequence(x):
            return 1 + (depth(x[0]) if len(x) else 1)
        return 0

    d = depth(videos)
    if d <= 1:
        return [_frames(videos)], False  # one video given as its frames
    if d == 2:
        return [_frames(v) for v in videos], False
    return [[_frames(v) for v in (sample or [])] for sample in videos], True


class OmniLMMProcessor(ProcessorMixin):
    r"""Constructs an OmniLMM processor: an [`OmniLMMImageProcessor`] and a (Mistral v0.1) tokenizer.

    Args:
        image_processor ([`OmniLMMImageProcessor`]): resizes (square mode) or slices (slice mode) the images.
        tokenizer ([`PreTrainedTokenizerBase`]): the tokenizer; it must know `<im_patch>`, `<im_start>`, `<im_end>`.
        chat_template (`str`, *optional*): defaults to the tokenizer's (OmniLMM's Zephyr format).
        num_query (`int`, defaults to 256): image tokens per span (the resampler's query count; 64 for
            MiniCPM-V-style slicing models). Must match the model's `config.num_query`.
    """

    image_token = "<image>"
    video_token = "<video>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_query=256, **kwargs):
        if kwargs:
            logger.warning_once(f"OmniLMMProcessor ignores the unknown arguments {sorted(kwargs)}.")
        if isinstance(num_query, bool) or not isinstance(num_query, int) or num_query < 1:
            raise ValueError(f"num_query must be a positive integer, got {num_query!r}")
        self.num_query = num_query
        if chat_template is None and tokenizer is not None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self._check_tokenizer()

    # ----------------------------------------------------------------------------------------------------------
    # Tokens
    # ----------------------------------------------------------------------------------------------------------

    def _check_tokenizer(self):
        ids = {}
        unk = self.tokenizer.unk_token_id
        for token in (IM_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (token_id == unk and token != self.tokenizer.unk_token):
                raise ValueError(
                    f"The tokenizer has no {token} token; OmniLMM needs {IM_PATCH_TOKEN}, {IM_START_TOKEN} and "
                    f"{IM_END_TOKEN} as added tokens."
                )
            ids[token] = token_id
        self.im_patch_token_id = ids[IM_PATCH_TOKEN]
        self.im_start_token_id = ids[IM_START_TOKEN]
        self.im_end_token_id = ids[IM_END_TOKEN]

    @property
    def image_span(self) -> str:
        """The text of one image span: `<im_start>` + `num_query` x `<im_patch>` + `<im_end>`."""
        return IM_START_TOKEN + IM_PATCH_TOKEN * self.num_query + IM_END_TOKEN

    def image_placeholder(self, grid=None) -> str:
        """The text that replaces one `<image>`: its source span, then per row of the `(cols, rows)` grid a
        `"\\n"` and that row's spans (slice mode); just one span when `grid` is `None`."""
        span = self.image_span
        if grid is None:
            return span
        cols, rows = grid
        return span + "".join("\n" + span * cols for _ in range(rows))

    def _special_affixes(self):
        """The ids the tokenizer adds before / after a sequence with `add_special_tokens=True` (BOS for OmniLMM)."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain) :])
        return [], []

    # ----------------------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _normalize_text(text):
        if text is None:
            return None
        if isinstance(text, str):
            return [text]
        if _is_sequence(text) and all(isinstance(t, str) for t in text):
            if not text:
                raise ValueError("`text` is an empty list.")
            return list(text)
        raise TypeError(
            f"`text` must be a string or a list of strings, got {type(text).__name__}"
            + (f" of {sorted({type(t).__name__ for t in text})}" if _is_sequence(text) else "")
        )

    def _placeholders(self, sample: str, sanitized: bool):
        """The kinds ("image" / "video") of the placeholders of one prompt, in reading order, with their spans."""
        pattern = f"{_UNMARKED}({re.escape(self.image_token)}|{re.escape(self.video_token)})" if sanitized else (
            f"({re.escape(self.image_token)}|{re.escape(self.video_token)})"
        )
        return [
            ("image" if m.group(1) == self.image_token else "video", m.span())
            for m in re.finditer(pattern, sample)
        ]

    @staticmethod
    def _distribute(items, counts, what, placeholder, nested):
        """Split `items` (flat, in order, or nested per sample) over the samples according to `counts`."""
        total = sum(counts)
        if nested:
            if len(items) != len(counts):
                raise ValueError(
                    f"`{what}` has {len(items)} lists (one per prompt) but there are {len(counts)} prompts."
                )
            for index, (sample, count) in enumerate(zip(items, counts)):
                if len(sample) != count:
                    raise ValueError(
                        f"Prompt {index} has {count} {placeholder} placeholder(s) but {len(sample)} {what} were "
                        f"given for it; the number of {placeholder} placeholders must equal the number of {what}."
                    )
            return [list(sample) for sample in items]
        if len(items) != total:
            raise ValueError(
                f"The prompts have {total} {placeholder} placeholder(s) ({', '.join(map(str, counts))} per prompt) but "
                f"{len(items)} {what} were given; the number of {placeholder} placeholders must equal the number of "
                f"{what}."
            )
        out, start = [], 0
        for count in counts:
            out.append(list(items[start : start + count]))
            start += count
        return out

    def _fetch(self, image):
        if _is_url(image):
            from transformers.image_utils import load_image

            return load_image(image)
        return image

    def _process_visuals(self, units, image_kwargs, return_tensors):
        """`units`: per sample, a list of (image, max_slice_nums or None) in span order.
        Returns per sample: list of (tensors, grid, size)."""
        groups = {}
        for s, sample in enumerate(units):
            for u, (image, max_slice_nums) in enumerate(sample):
                groups.setdefault(max_slice_nums, []).append((s, u, self._fetch(image)))
        results = [[None] * len(sample) for sample in units]
        for max_slice_nums, members in groups.items():
            kwargs = dict(image_kwargs)
            if max_slice_nums is not None:
                kwargs["max_slice_nums"] = max_slice_nums
            if return_tensors == "np":
                kwargs["return_tensors"] = "np"
            out = self.image_processor([[image] for _, _, image in members], **kwargs)
            for index, (s, u, _) in enumerate(members):
                results[s][u] = (out["pixel_values"][index], out["slice_grids"][index][0], out["image_sizes"][index][0])
        return results

    # ----------------------------------------------------------------------------------------------------------
    # __call__
    # ----------------------------------------------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        audio=None,
        padding=True,
        truncation=None,
        max_length=None,
        return_tensors="pt",
        max_slice_nums=None,
        **kwargs,
    ) -> BatchFeature:
        """Expand the `<image>` placeholders of `text`, process `images`, tokenise and pad (left, by default).

        Args:
            images: `None`, one image, a flat list of images (given to the prompts in the order of their `<image>`
                placeholders) or a list per prompt of lists of images. An image is a PIL image, a numpy array, a
                torch tensor, a file path or an http(s) URL.
            text (`str` or `list[str]`): the prompt(s), with one `<image>` per image (e.g. from
                `apply_chat_template(..., tokenize=False)`).
            videos: like `images`, each video a list of frames (or a 4-D array); each `<video>` placeholder
                becomes one `<image>` per frame, joined by `"\\n"`.
            padding (`bool` or `str`, defaults to `True`): `True`/`"longest"`, `"max_length"` or `False`.
            truncation (`bool` or `str`, *optional*): truncate to `max_length` (on the tokenizer's
                `truncation_side`). Image spans are never cut: a prompt whose spans would not fit is a `ValueError`.
            max_length (`int`, *optional*): the length for truncation / `padding="max_length"`.
            return_tensors (`str`, defaults to `"pt"`): `"pt"`, `"np"` or `None` for `input_ids` and
                `attention_mask`; `pixel_values` stay lists (their sizes may differ).
            max_slice_nums (`int`, *optional*): slice mode only, the most tiles per image.
            **kwargs: tokenizer options (`add_special_tokens`, `pad_to_multiple_of`, `padding_side`,
                `return_offsets_mapping`, ...) and image options (`slice_mode`, `never_split`); also accepted
                nested as `text_kwargs={...}` / `images_kwargs={...}`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask` (from the tokenizer: 0 only on padding) and, when
            images are given, `pixel_values`, `image_sizes` (the original `(w, h)` per image) and `slice_grids`
            (`(cols, rows)` per image, `None` when not sliced).
        """
        if audio is not None:
            raise ValueError("OmniLMM does not take audio.")
        text_kwargs, image_kwargs = self._split_kwargs(kwargs)
        if max_slice_nums is not None:
            image_kwargs["max_slice_nums"] = max_slice_nums

        texts = self._normalize_text(text)
        if texts is None and images is None and videos is None:
            raise ValueError("OmniLMMProcessor needs `text` and/or `images`.")

        if texts is None:  # images only: just the image features
            image_list, nested = _as_image_list(images) if images is not None else ([], False)
            samples = image_list if nested else [[image] for image in image_list]
            if videos is not None:
                raise ValueError("Videos need a prompt with <video> placeholders.")
            units = [[(image, None) for image in sample] for sample in samples]
            results = self._process_visuals(units, image_kwargs, return_tensors)
            return BatchFeature(self._visual_outputs(results), tensor_type=None)

        sanitized = bool(text_kwargs.get("sanitize_control_tokens")) and _MARKED_RE is not None
        placeholders = [self._placeholders(sample, sanitized) for sample in texts]
        image_counts = [sum(kind == "image" for kind, _ in p) for p in placeholders]
        video_counts = [sum(kind == "video" for kind, _ in p) for p in placeholders]

        if images is None:
            if sum(image_counts):
                raise ValueError(
                    f"The prompts have {sum(image_counts)} {self.image_token} placeholder(s) but no images were given; "
                    f"the number of {self.image_token} placeholders must equal the number of images."
                )
            per_sample_images = [[] for _ in texts]
        else:
            image_list, nested = _as_image_list(images)
            per_sample_images = self._distribute(image_list, image_counts, "images", self.image_token, nested)
        if videos is None:
            if sum(video_counts):
                raise ValueError(
                    f"The prompts have {sum(video_counts)} {self.video_token} placeholder(s) but no videos were given."
                )
            per_sample_videos = [[] for _ in texts]
        else:
            video_list, nested = _as_video_list(videos)
            per_sample_videos = self._distribute(video_list, video_counts, "videos", self.video_token, nested)

        # Visual units (one per span group) in reading order.
        units = []
        for s, sample_placeholders in enumerate(placeholders):
            images_left, videos_left = iter(per_sample_images[s]), iter(per_sample_videos[s])
            sample_units = []
            for kind, _ in sample_placeholders:
                if kind == "image":
                    sample_units.append((next(images_left), None))
                else:
                    frames = next(videos_left)
                    if not frames:
                        raise ValueError("A video has no frames.")
                    frame_slices = 1 if len(frames) > MAX_SLICED_VIDEO_FRAMES else None
                    sample_units.extend((frame, frame_slices) for frame in frames)
            units.append(sample_units)
        results = self._process_visuals(units, image_kwargs, return_tensors) if any(units) else None

        # Expand the placeholders, keeping track of where each replacement went (for assistant masks).
        expanded, replacement_offsets = [], []
        for s, (sample, sample_placeholders) in enumerate(zip(texts, placeholders)):
            pieces, offsets, last, shift, unit, video = [], [], 0, 0, 0, 0
            for kind, (start, end) in sample_placeholders:
                count = 1 if kind == "image" else len(per_sample_videos[s][video])
                video += kind == "video"
                replacement = "\n".join(self.image_placeholder(results[s][unit + i][1]) for i in range(count))
                unit += count
                pieces += [sample[last:start], replacement]
                new_start = start + shift
                offsets.append(
                    {
                        "type": kind,
                        "span": (start, end),
                        "new_span": (new_start, new_start + len(replacement)),
                        "text": sample[start:end],
                        "replacement": replacement,
                    }
                )
                shift += len(replacement) - (end - start)
                last = end
            pieces.append(sample[last:])
            expanded.append("".join(pieces))
            replacement_offsets.append(offsets)

        data = self._tokenize(expanded, units, results, padding, truncation, max_length, return_tensors, text_kwargs)
        if text_kwargs.get("return_text_replacement_offsets"):
            data["text_replacement_offsets"] = replacement_offsets
        if images is not None or videos is not None:
            data.update(self._visual_outputs(results or [[] for _ in texts]))
        skip = ["pixel_values", "image_sizes", "slice_grids", "text_replacement_offsets"]
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=skip)

    def _split_kwargs(self, kwargs):
        kwargs = dict(kwargs)
        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        kwargs.update(kwargs.pop("common_kwargs", None) or {})
        kwargs.pop("videos_kwargs", None)
        kwargs.pop("audio_kwargs", None)
        for key in list(kwargs):
            if key in _TEXT_KWARGS:
                text_kwargs[key] = kwargs.pop(key)
            elif key in _IMAGE_KWARGS:
                image_kwargs[key] = kwargs.pop(key)
            elif key in _IGNORED_KWARGS:
                kwargs.pop(key)
        if kwargs:
            logger.warning_once(f"OmniLMMProcessor ignores the unknown arguments {sorted(kwargs)}.")
        return text_kwargs, image_kwargs

    @staticmethod
    def _visual_outputs(results):
        pixel_values, image_sizes, slice_grids = [], [], []
        for sample in results:
            pixel_values.append([tensor for tensors, _, _ in sample for tensor in tensors])
            image_sizes.append([tuple(size) for _, _, size in sample])
            slice_grids.append([tuple(grid) if grid is not None else None for _, grid, _ in sample])
        return {"pixel_values": pixel_values, "image_sizes": image_sizes, "slice_grids": slice_grids}

    def _tokenize(self, texts, units, results, padding, truncation, max_length, return_tensors, text_kwargs):
        text_kwargs = dict(text_kwargs)
        add_special_tokens = text_kwargs.pop("add_special_tokens", True)
        return_offsets = bool(text_kwargs.pop("return_offsets_mapping", False))
        return_attention_mask = text_kwargs.pop("return_attention_mask", None)
        return_length = text_kwargs.pop("return_length", False)
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        padding_side = text_kwargs.pop("padding_side", None)
        verbose = text_kwargs.pop("verbose", True)
        text_kwargs.pop("return_text_replacement_offsets", None)
        encoded = self.tokenizer(
            texts,
            add_special_tokens=False,
            padding=False,
            truncation=False,
            return_attention_mask=False,
            return_offsets_mapping=return_offsets,
            **text_kwargs,
        )
        prefix, suffix = self._special_affixes() if add_special_tokens else ([], [])
        bos_id = self.tokenizer.bos_token_id

        truncate = truncation not in (None, False, "do_not_truncate")
        if truncate and max_length is None:
            max_length = self.tokenizer.model_max_length
        if truncate and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
            raise ValueError(f"max_length must be a positive integer to truncate, got {max_length!r}.")
        side = getattr(self.tokenizer, "truncation_side", "right")
        image_ids = {self.im_patch_token_id, self.im_start_token_id, self.im_end_token_id}

        all_ids, all_offsets = [], []
        for index, ids in enumerate(encoded["input_ids"]):
            ids = list(ids)
            offsets = list(encoded["offset_mapping"][index]) if return_offsets else None
            head = prefix
            if prefix and bos_id is not None and prefix == [bos_id] and ids[:1] == [bos_id]:
                head = []  # the prompt already starts with BOS: never two
            ids = head + ids + suffix
            if offsets is not None:
                offsets = [(0, 0)] * len(head) + offsets + [(0, 0)] * len(suffix)

            expected_spans = sum(len(tensors) for tensors, _, _ in (results[index] if results else []))
            self._check_spans(index, ids, expected_spans)
            if truncate and len(ids) > max_length:
                keep = slice(0, max_length) if side == "right" else slice(len(ids) - max_length, len(ids))
                image_positions = [i for i, token in enumerate(ids) if token in image_ids]
                kept = range(len(ids))[keep]
                if image_positions and (image_positions[0] < kept.start or image_positions[-1] >= kept.stop):
                    n_image = len(image_positions)
                    raise ValueError(
                        f"Prompt {index} is {len(ids)} tokens long, {n_image} of them in {expected_spans} image "
                        f"span(s) of {self.num_query + 2} tokens; truncating it to max_length={max_length} (from the {side}) "
                        f"would cut through the image spans. The images alone need {n_image} tokens: raise max_length, "
                        "shorten the text, or use fewer slices (max_slice_nums)."
                    )
                ids = ids[keep]
                if offsets is not None:
                    offsets = offsets[keep]
            all_ids.append(ids)
            all_offsets.append(offsets)

        pad_to_max_length = padding == "max_length" or getattr(padding, "value", None) == "max_length"
        padded = self.tokenizer.pad(
            {"input_ids": all_ids},
            padding=padding,
            max_length=max_length if pad_to_max_length else None,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
            return_attention_mask=True,
            return_tensors=None,
            verbose=verbose,
        )
        data = {"input_ids": padded["input_ids"]}
        if return_attention_mask is not False:
            data["attention_mask"] = padded["attention_mask"]
        if return_offsets:
            side_pad = padding_side or self.tokenizer.padding_side
            padded_offsets = []
            for ids, offsets in zip(padded["input_ids"], all_offsets):
                extra = [(0, 0)] * (len(ids) - len(offsets))
                padded_offsets.append(extra + offsets if side_pad == "left" else offsets + extra)
            data["offset_mapping"] = padded_offsets
        if return_length:
            data["length"] = [len(ids) for ids in all_ids]
        return data

    def _check_spans(self, index, ids, expected_spans):
        starts = sum(token == self.im_start_token_id for token in ids)
        ends = sum(token == self.im_end_token_id for token in ids)
        patches = sum(token == self.im_patch_token_id for token in ids)
        if starts != expected_spans or ends != expected_spans or patches != expected_spans * self.num_query:
            raise ValueError(
                f"Prompt {index} has {starts} {IM_START_TOKEN}, {ends} {IM_END_TOKEN} and {patches} {IM_PATCH_TOKEN} "
                f"tokens after expansion, but its images need {expected_spans} span(s) of {self.num_query} patches: "
                f"write images as {self.image_token} placeholders, not as literal image tokens."
            )

    # ----------------------------------------------------------------------------------------------------------
    # Decoding, saving
    # ----------------------------------------------------------------------------------------------------------

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode the output of `generate` (a `(batch, length)` tensor or list of sequences: a list of strings;
        one sequence: a string). Image spans are special tokens, so `skip_special_tokens=True` drops them."""
        sequences = getattr(generated_outputs, "sequences", generated_outputs)
        if _is_array(sequences) and sequences.ndim == 1:
            return self.tokenizer.decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        if _is_array(sequences) or (_is_sequence(sequences) and sequences and not isinstance(sequences[0], int)):
            return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return self.tokenizer.decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save `processor_config.json` (with `auto_map` for `AutoProcessor` and, nested, for
        `AutoImageProcessor`), the tokenizer files (and its SentencePiece `tokenizer.model` when it has one), the
        chat template and this file and `image_processing_omnilmm.py`, so that
        `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` returns an `OmniLMMProcessor`."""
        if self._auto_class is None:
            type(self).register_for_auto_class("AutoProcessor")
        image_processor_class = type(self.image_processor)
        is_custom = not image_processor_class.__module__.startswith("transformers.")
        if is_custom and getattr(image_processor_class, "_auto_class", None) is None:
            image_processor_class.register_for_auto_class("AutoImageProcessor")
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        vocab_file = getattr(self.tokenizer, "vocab_file", None)
        if isinstance(vocab_file, str) and vocab_file and os.path.isfile(vocab_file):
            target = Path(save_directory) / "tokenizer.model"
            if not target.exists():
                shutil.copyfile(vocab_file, target)
        # transformers 5 keeps BOS/EOS in tokenizer.json's post-processor and drops these keys from
        # tokenizer_config.json; write them back for readers (and loaders) that look for them there.
        config_file = Path(save_directory) / "tokenizer_config.json"
        if config_file.is_file():
            prefix, suffix = self._special_affixes()
            config = json.loads(config_file.read_text(encoding="utf-8"))
            bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
            config.setdefault("add_bos_token", bos is not None and prefix == [bos])
            config.setdefault("add_eos_token", eos is not None and suffix == [eos])
            text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            config_file.write_text(text, encoding="utf-8")
        return files


__all__ = ["OmniLMMProcessor"]
