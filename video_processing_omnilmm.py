# Copyright 2026 The omnilmm-hf authors. Licensed under the Apache License, Version 2.0.
"""OmniLMM video processor: a video (a file, URL, bytes or its frames) -> sampled frames, each one an image of the PIL
image processor (same slicing and normalisation, bit for bit). Sampling is MiniCPM-V's recipe: `fps` frames per second
(1), uniform and centred down to `max_num_frames` (64); more than `max_sliced_frames` (16) frames are not sliced.
Files are decoded with PyAV (`pip install av`), seeking to each kept frame instead of decoding the whole stream."""

import bisect
import io
import itertools
import os

import numpy as np
import torch
from PIL import Image

from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import VideosKwargs
from transformers.utils import logging
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from .image_processing_omnilmm import (
    OmniLMMImageProcessor,
    OmniLMMImageProcessorKwargs,
    SETTING_NAMES,
    SLICE_NAMES,
    _check_pixels,
    _is_count,
    _OmniLMMImageProcessorMixin,
    load_image,
    num_views,
)


logger = logging.get_logger(__name__)
VIDEO_SETTING_NAMES = ("fps", "num_frames", "max_num_frames", "max_sliced_frames", "do_sample_frames")
# Decoders that mark the frames no other frame refers to (B-frames), so that skipping them changes no other frame;
# others (a GIF's frames build on each other) decode every frame.
SKIPS_NON_REFERENCE_FRAMES = ("h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4")
AV_MISSING = "Reading video files needs PyAV: `pip install av` (or the `omnilmm-hf[video]` extra)."


def sample_frame_indices(total_num_frames, video_fps=None, fps=1, num_frames=None, max_num_frames=64) -> list[int]:
    """MiniCPM-V's frame sampling: every `round(video_fps / fps)`-th frame from the first, then, if more than
    `max_num_frames`, that many of them taken uniformly, each from the middle of its share. `num_frames` instead: that
    many frames taken the same way from all frames. `video_fps=None` (frames without a rate): every frame."""
    if num_frames is not None:
        if num_frames > total_num_frames:
            raise ValueError(f"num_frames={num_frames} is more than the video's {total_num_frames} frames.")
        candidates, limit = range(total_num_frames), num_frames
    else:
        step = 1 if video_fps is None else max(1, round(video_fps / fps))
        candidates, limit = range(0, total_num_frames, step), max_num_frames
    if len(candidates) <= limit:
        return list(candidates)
    gap = len(candidates) / limit
    return [candidates[int(i * gap + gap / 2)] for i in range(limit)]


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(AV_MISSING) from None
    return av


def _source(video):
    """What PyAV opens, and the name errors use: a path (str / os.PathLike), bytes or a binary file object."""
    if isinstance(video, (bytes, bytearray, memoryview)):
        return io.BytesIO(video), "the video bytes"
    if hasattr(video, "read"):
        return video, "the video file object"
    path = os.fspath(video)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No video file at {path!r}.")
    return path, repr(path)


class VideoFile:
    """An opened video file: its metadata (`total_num_frames`, `fps`, `width`, `height`, `duration`) and
    `frames(indices)`, which decodes only those frames (in display order, upright). Frame `i` is the `i`-th frame in
    presentation order, as decoders count them (decord's index): the packets are read once (not decoded) for their
    timestamps and keyframes."""

    def __init__(self, video):
        av = _import_av()
        self.source, self.name = _source(video)
        try:
            self.container = av.open(self.source)
            self._check_stream()
            stream = self.stream = self.container.streams.video[0]
            # (Set before the decoder opens.) Frame threads decode ahead of each seek: measured slower for sampling
            # than slice threads, which split a frame where its encoder cut it into slices.
            stream.thread_type = "SLICE"
            packets = [(p.pts, p.is_keyframe) for p in self.container.demux(stream) if p.pts is not None]
        except av.error.EOFError:
            self.close()
            raise ValueError(f"{self.name} holds no video frames (it ends before the first one).") from None
        except av.error.FFmpegError as error:
            self.close()
            raise ValueError(f"Could not read {self.name} as a video (not a video file, or truncated or corrupt): "
                             f"{error}") from None
        except ValueError:
            self.close()
            raise
        self.pts = sorted(pts for pts, _ in packets)  # frame i is shown at self.pts[i]
        self.keyframes = sorted(pts for pts, key in packets if key)  # where decoding can start
        if not self.pts:
            self.close()
            raise ValueError(f"{self.name} has no video frames.")
        rate = stream.average_rate or stream.guessed_rate
        self.total_num_frames, self.fps = len(self.pts), float(rate) if rate else None
        self.width, self.height = stream.codec_context.width, stream.codec_context.height

    def _check_stream(self):
        image_format = self.container.format.name  # a picture, which FFmpeg would read as a 1-frame video
        if image_format == "image2" or image_format.endswith("_pipe"):
            raise ValueError(f"{self.name} is an image ({image_format.removesuffix('_pipe')}), not a video: give it "
                             "as an image.")
        if not self.container.streams.video:
            raise ValueError(f"{self.name} has no video stream.")
        if self.container.streams.video[0].codec_context is None:  # FFmpeg knows no decoder for its codec
            raise ValueError(f"{self.name} is encoded with a codec this PyAV build cannot decode: re-encode it "
                             "(H.264, VP9 or AV1, for example).")

    def metadata(self) -> VideoMetadata:
        duration = self.total_num_frames / self.fps if self.fps else None
        return VideoMetadata(total_num_frames=self.total_num_frames, fps=self.fps, width=self.width,
                             height=self.height, duration=duration, video_backend="pyav")

    def frames(self, indices) -> list[np.ndarray]:
        """The frames at `indices` (sorted, unique) as `(h, w, 3)` uint8 RGB arrays, upright. The output equals
        decoding every frame and keeping those, but a kept frame in a later group of pictures is reached by seeking to
        its keyframe, and frames before a kept one are decoded only if other frames refer to them."""
        av = _import_av()
        out, decoded, self._group = [], None, None
        try:
            for index in indices:
                self._target = target = self.pts[index]
                keyframe = self.keyframes[max(0, bisect.bisect_right(self.keyframes, target) - 1)]
                if decoded is None or keyframe > self._group:  # not reached by decoding on: seek there
                    decoded = self._seek(keyframe, target)
                frame = next((f for f in decoded if f.pts is not None and f.pts >= target), None)
                if frame is None:
                    break
                rotated = np.rot90(frame.to_ndarray(format="rgb24"), k=round((frame.rotation or 0) / 90))
                out.append(np.ascontiguousarray(rotated))
        except av.error.FFmpegError as error:
            raise ValueError(f"Could not decode {self.name} (corrupt, or a codec this PyAV lacks): {error}") from None
        if len(out) < len(indices):
            raise ValueError(f"{self.name} ends before its last frames can be decoded: it is truncated or corrupt.")
        return out

    def _seek(self, keyframe, target):
        """Decoded frames from `keyframe` on; from an earlier keyframe, then the start, should the demuxer land past
        the frame at `target`."""
        earlier = [k for k in self.keyframes if k < keyframe][::-1]
        for position in [keyframe, *earlier, None]:
            if position is None:
                self.container.seek(0)  # the start, whatever the container's index says
            else:
                self.container.seek(int(position), stream=self.stream)
            self._group, decoded = self.keyframes[0] if position is None else position, self._decoded()
            first = next(decoded, None)
            if first is None or first.pts is None or first.pts <= target:
                break
        return itertools.chain([first] if first is not None else [], decoded)

    def _decoded(self):
        """The stream's frames from the current position; packets before the current target are decoded only if
        other frames refer to them (`skip_frame`), and `_group` follows the last keyframe fed to the decoder."""
        context = self.stream.codec_context
        skips = context.name in SKIPS_NON_REFERENCE_FRAMES
        for packet in self.container.demux(self.stream):
            if packet.is_keyframe and packet.pts is not None:
                self._group = max(self._group, packet.pts)
            if skips:
                context.skip_frame = "NONREF" if packet.pts is not None and packet.pts < self._target else "DEFAULT"
            yield from packet.decode()

    def close(self):
        if getattr(self, "container", None) is not None:
            self.container.close()


class OmniLMMVideoProcessorKwargs(OmniLMMImageProcessorKwargs, VideosKwargs, total=False):
    r"""
    max_num_frames (`int`): the most frames sampled from a video (64).
    max_sliced_frames (`int`): a video of more frames than this (16) is read unsliced, one view per frame.
    max_views (`int`, *optional*): the most views (one per unsliced frame; overview + tiles per sliced frame) a video
        may take; the processor sets it from the room left in the model's context. Fewer frames are sampled, and
        frames are not sliced, to stay within it.
    """

    max_num_frames: int
    max_sliced_frames: int
    max_views: int | None


class OmniLMMVideoProcessor(_OmniLMMImageProcessorMixin, BaseVideoProcessor):
    r"""OmniLMM / MiniCPM-V video processor: videos in (a path, http(s) URL, `Path`, bytes, a list of frames or a 4-D
    array, frames first), sampled frames out, each processed exactly as `OmniLMMImageProcessor` processes that frame.

    Sampling (`do_sample_frames`): `fps` frames per second, uniformly down to `max_num_frames`, or exactly
    `num_frames`; frames given without `video_metadata` (no frame rate) are all kept, up to `max_num_frames`. Returns a
    `BatchFeature`: `pixel_values_videos` (per video, its frames' `(3, H, W)` views in span order), `video_slice_grids`
    (per video, per frame, `(cols, rows)` or None), `video_sizes` (`(num_frames, height, width)`) and, with
    `return_metadata=True`, `video_metadata` (the sampled `frames_indices` among them)."""

    model_input_names = ["pixel_values_videos"]
    valid_kwargs = OmniLMMVideoProcessorKwargs
    setting_names = (*SETTING_NAMES, *VIDEO_SETTING_NAMES)
    fps, num_frames, max_num_frames, max_sliced_frames, do_sample_frames = 1, None, 64, 16, True

    @classmethod
    def from_image_processor(cls, image_processor, **kwargs):
        """A video processor with the image processor's settings (slicing, normalisation, pixel limit)."""
        return cls(**{key: getattr(image_processor, key) for key in SETTING_NAMES}, **kwargs)

    def _settings(self, **overrides):
        s = super()._settings(**overrides)
        checks = (("fps", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a positive "
                   "number"), ("num_frames", lambda v: v is None or _is_count(v), "a positive integer (or None)"),
                  ("max_num_frames", _is_count, "a positive integer"),
                  ("max_sliced_frames", lambda v: _is_count(v, minimum=0), "an integer >= 0"))
        for name, valid, what in checks:
            if not valid(s[name]):
                raise ValueError(f"{name} must be {what}, got {s[name]!r}.")
        return s

    def preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        """`videos`: one video or a list of them; settings as keywords (None = the processor's own), and `max_views`
        (see `plan`)."""
        metadata, return_metadata = kwargs.pop("video_metadata", None), kwargs.pop("return_metadata", False)
        max_views = kwargs.pop("max_views", None)
        s = self._settings(**{key: kwargs.pop(key) for key in self.setting_names if key in kwargs})
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}.")
        unused = sorted(key for key, value in kwargs.items() if value is not None and key != "device")
        if unused:
            logger.warning_once(f"{type(self).__name__}.preprocess ignores the arguments {unused}.")
        videos = _video_list(videos)
        metadata = metadata if isinstance(metadata, (list, tuple)) else [metadata] * len(videos)
        if len(metadata) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(metadata)} `video_metadata` entries; give one per video.")
        data = {"pixel_values_videos": [], "video_slice_grids": [], "video_sizes": [], "video_metadata": []}
        for video, meta in zip(videos, metadata):
            frames, meta, sliced = self._sampled_frames(video, meta, s, max_views)
            views, grids, size = self._process_frames(frames, s if sliced else {**s, "max_slice_nums": 1})
            if return_tensors == "np":
                views = [view.numpy() for view in views]
            for key, value in zip(data, (views, grids, size, meta)):
                data[key].append(value)
        if not return_metadata:
            del data["video_metadata"]
        return BatchFeature(data=data, tensor_type=None)  # None: ragged lists

    def plan(self, metadata, max_views=None, **kwargs) -> tuple[list[int], bool]:
        """The frames a video of `metadata` (`total_num_frames`, `fps`: None for frames given without a rate,
        `width`, `height`) is sampled to, and whether they are sliced, with the settings `kwargs` (None = the
        processor's own). At most `max_views` views in all (the processor sets it from the room left in the model's
        context): fewer frames, unsliced, are taken to fit; an explicit `num_frames` that does not fit is an error."""
        s = self._settings(**kwargs)
        total, video_fps, limit = metadata.total_num_frames, metadata.fps, s["max_num_frames"]
        if max_views is not None and not _is_count(max_views):
            raise ValueError(f"max_views must be a positive integer, got {max_views!r}.")
        if max_views is not None and (s["num_frames"] or 0) > max_views:
            raise ValueError(f"num_frames={s['num_frames']} frames take at least {s['num_frames']} views, more than "
                             f"the {max_views} that fit (max_views): lower num_frames, or shorten the prompt.")
        indices = list(range(total))
        if s["do_sample_frames"] and (s["num_frames"] or video_fps or total > limit):
            indices = sample_frame_indices(total, video_fps, s["fps"], s["num_frames"], min(limit, max_views or limit))
            wanted = len(sample_frame_indices(total, video_fps, s["fps"], s["num_frames"], limit))
            if len(indices) < wanted:
                logger.warning_once(f"A video was sampled to {len(indices)} frames instead of {wanted}: that is what "
                                    "fits in the room left in the model's context. Set max_num_frames or fps lower to "
                                    "choose the frames yourself.")
        if max_views is not None and len(indices) > max_views:
            raise ValueError(f"The video's {len(indices)} frames (do_sample_frames=False) take more than the "
                             f"{max_views} views that fit in the model's context: give fewer frames, or sample them.")
        grid = self.frame_grid(len(indices), (metadata.width, metadata.height), **kwargs)
        return indices, grid is not None and (max_views is None or len(indices) * num_views(grid) <= max_views)

    def frame_grid(self, num_frames, frame_size, /, **kwargs):
        """The `(cols, rows)` grid each of `num_frames` frames of `frame_size = (w, h)` is sliced to, or None (a video
        of more than `max_sliced_frames` frames is not sliced); settings as for `plan`."""
        s = self._settings(**kwargs)
        if num_frames > s["max_sliced_frames"]:
            return None
        return self.slice_grid(frame_size, **{key: s[key] for key in ("slice_mode", *SLICE_NAMES)})

    def load(self, video, video_metadata=None, **kwargs):
        """A video's sampled frames (`(h, w, 3)` uint8 arrays, or the images given) and its metadata (the sampled
        `frames_indices` set), without processing their pixels; settings as for `preprocess`."""
        return self._sampled_frames(video, video_metadata, self._settings(**kwargs), None)[:2]

    def _sampled_frames(self, video, metadata, s, max_views):
        """The frames to process (arrays or PIL images), the video's metadata (`frames_indices` set) and whether the
        frames are sliced (`plan`)."""
        settings = {key: s[key] for key in self.setting_names}
        if not isinstance(video, (list, tuple, np.ndarray, torch.Tensor)):  # a file, URL or bytes: decode
            opened = VideoFile(_fetch(video))
            try:
                _check_pixels(opened.width, opened.height, s["max_image_pixels"], what=f"video {opened.name}'s frame")
                meta = opened.metadata()
                indices, sliced = self.plan(meta, max_views, **settings)
                frames = opened.frames(indices)
            finally:
                opened.close()
        else:
            frames = list(video)  # (read as images once kept: `_process_frames`)
            if not frames:
                raise ValueError("A video must be a file, a non-empty list of frames or a 4-D array (frames first).")
            first = load_image(frames[0], s["max_image_pixels"])
            given = dict(metadata or {})  # a rate (`fps`) given with the frames lets them be sampled in time
            meta = VideoMetadata(**{**given, "total_num_frames": len(frames), "fps": given.get("fps"),
                                    "width": first.width, "height": first.height})
            indices, sliced = self.plan(meta, max_views, **settings)
            frames = [frames[i] for i in indices]
        meta.frames_indices = indices
        return frames, meta, sliced

    def _process_frames(self, frames, s):
        """Frames -> (their views in span order, per frame its slice grid, `(num_frames, height, width)`), each frame
        through the PIL image processor's own per-image code: the same pixels as that frame given as an image."""
        images = [load_image(frame, s["max_image_pixels"]) for frame in frames]
        views, grids = [], []
        for image in images:
            tensors, grid = OmniLMMImageProcessor._process_one(self, image, s)
            views.extend(tensors)
            grids.append(grid)
        return views, grids, (len(images), images[0].height, images[0].width)


def _fetch(video):
    """http(s) URLs are downloaded (PyAV then decodes the bytes), as transformers' own video loader does; anything else
    is returned as it is."""
    if isinstance(video, str) and video.startswith(("http://", "https://")):
        from huggingface_hub.utils import httpx

        try:
            response = httpx.get(video, follow_redirects=True)
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise ValueError(f"Could not download the video at {video}: {error}") from None
        return response.content
    return video


def _is_frame(item) -> bool:
    return isinstance(item, Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def _video_list(videos) -> list:
    """One video (a file, URL, bytes, a list of frames, a 4-D array) or a list of videos -> a list of videos."""
    if isinstance(videos, (str, os.PathLike, bytes, bytearray)) or hasattr(videos, "read"):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 5:
            return list(videos)
        if videos.ndim != 4:
            raise ValueError(f"A video array must be 4-D (frames first), got shape {tuple(videos.shape)}.")
        return [videos]
    if isinstance(videos, (list, tuple)) and videos and all(_is_frame(item) for item in videos):
        return [list(videos)]
    if isinstance(videos, (list, tuple)) and videos:
        return list(videos)
    raise TypeError(f"Expected a video (a file path, URL, bytes, a list of frames or a 4-D array) or a list of "
                    f"videos, got {type(videos).__name__}.")


__all__ = ["OmniLMMVideoProcessor", "VideoFile", "sample_frame_indices"]
