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
"""Image processor for OmniLMM (square mode) and MiniCPM-V style slicing (slice mode).

Every image goes through PIL: ``convert("RGB")`` (alpha dropped, as the original), PIL bicubic
resizes, then ``uint8 / 255`` and the OpenAI-CLIP mean/std in float32, which is bit for bit what
the original's torchvision ``ToTensor()`` + ``Normalize()`` produced.

- square mode: one ``(3, image_size, image_size)`` tensor per image, aspect ratio not kept.
- slice mode: one *source* (overview) tensor per image, then, when the image is large enough to be
  sliced, its tiles row by row, all of them sized by :func:`slice_layout`.
"""

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


logger = logging.get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Slice mode refuses thinner images: up to this ratio every view (source or tile) is at most about
# (scale_resolution / patch_size)**2 patches; beyond it the short side stays one patch and the long side keeps
# growing (a 1 x 100,000,000 strip would become one view of 320,000 patches).
MAX_ASPECT_RATIO = 1000
ACCEPTED_TYPES = (
    "a PIL.Image.Image, a numpy array (HWC or HW), a torch tensor (CHW or HW) or a file path (str or os.PathLike)"
)


# ---------------------------------------------------------------------------------------------
# Geometry: MiniCPM-V's slice_image(), without the pixels
# ---------------------------------------------------------------------------------------------


def _ensure_divide(length, patch_size):
    return max(round(length / patch_size) * patch_size, patch_size)


def _find_best_resize(size, scale_resolution, patch_size, allow_upscale=False):
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def slice_layout(image_size, max_slice_nums=9, scale_resolution=448, patch_size=14, never_split=False):
    """MiniCPM-V's slicing geometry for an image of ``image_size = (width, height)``.

    Returns ``(source_size, grid, slice_size)``: ``source_size`` is the ``(w, h)`` of the resized
    overview image; ``grid`` is ``(cols, rows)`` and ``slice_size`` the ``(w, h)`` of every tile,
    both ``None`` when the image is not sliced. All sizes are multiples of ``patch_size``.
    """
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise TypeError(f"slice_layout needs image_size = (width, height), got {image_size!r}.") from None
    checks = (("width", width), ("height", height), ("scale_resolution", scale_resolution), ("patch_size", patch_size))
    for name, value in checks:
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"slice_layout needs a positive integer {name}, got {value!r}.")
    if not isinstance(max_slice_nums, (int, np.integer)) or isinstance(max_slice_nums, bool) or max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be an integer >= 1 (1 = never slice), got {max_slice_nums!r}.")

    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1 or never_split:
        return _find_best_resize((width, height), scale_resolution, patch_size, allow_upscale=True), None, None

    source_size = _find_best_resize((width, height), scale_resolution, patch_size)
    # Candidate grids: every (cols, rows) factor pair of multiple-1, multiple, multiple+1 (without 1 and
    # without counts above max_slice_nums), by increasing count then increasing cols; first best wins.
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(cols, n // cols) for n in counts for cols in range(1, n + 1) if n % cols == 0]
    log_ratio = math.log(width / height)
    best_grid, min_error = None, float("inf")
    for cols, rows in candidates:
        error = abs(log_ratio - math.log(cols / rows))
        if error < min_error:
            best_grid, min_error = (cols, rows), error

    cols, rows = best_grid
    cell = (_ensure_divide(width, cols) / cols, _ensure_divide(height, rows) / rows)
    slice_size = _find_best_resize(cell, scale_resolution, patch_size, allow_upscale=True)
    return source_size, best_grid, slice_size


# ---------------------------------------------------------------------------------------------
# Inputs: anything image-like -> a decoded RGB PIL image, with guards
# ---------------------------------------------------------------------------------------------


def _check_pixels(width, height, max_image_pixels, what="image"):
    if width <= 0 or height <= 0:
        raise ValueError(f"The {what} has zero size ({width}x{height}).")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"The {what} is {width}x{height} = {width * height:,} pixels, more than max_image_pixels="
            f"{max_image_pixels:,} (a guard against decompression bombs). If you trust it, raise the limit: "
            "`OmniLMMImageProcessor(max_image_pixels=...)` or `image_processor.max_image_pixels = ...` "
            "(None disables the check)."
        )


def _array_to_pil(array, layout):
    """``array``: numpy, ``layout`` "HWC" or "CHW" (or 2-D HW); uint8, ints in [0, 255], bool or floats in [0, 1]."""
    if array.ndim == 3 and layout == "CHW" and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    elif array.ndim == 3 and layout == "HWC" and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # a channels-first numpy array
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Cannot read an image from an array of shape {tuple(array.shape)}: expected HW, HWC (numpy) or CHW "
            "(torch) with 1, 3 or 4 channels."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and not (array.min() >= 0.0 and array.max() <= 1.0):
            raise ValueError("Float image arrays must hold values in [0, 1]; pass 0..255 data as uint8.")
        array = np.rint(array.astype(np.float64) * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"Unsupported image array dtype {array.dtype}.")
        if array.size and not (array.min() >= 0 and array.max() <= 255):
            raise ValueError(f"Integer image arrays must hold values in [0, 255] (got dtype {array.dtype}).")
        array = array.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def _to_rgb(image):
    """``convert("RGB")`` with sensible ranges for the high-bit-depth modes (PIL would clip them)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image = image.convert("I")
        scale = 1 / 257  # 0..65535 -> 0..255
    elif image.mode == "I":
        scale = 1 / 257 if image.getextrema()[1] > 255 else 1
    elif image.mode == "F":
        low, high = image.getextrema()
        scale = 255 if low >= 0 and high <= 1 else 1
    else:
        if image.mode in ("La", "PA"):  # PIL converts premultiplied La to LA only
            image = image.convert("LA" if image.mode == "La" else "RGBA")
        return image.convert("RGB")
    values = np.rint(np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255)).astype(np.uint8)
    return Image.fromarray(values).convert("RGB")


def load_image(image, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """Turn one image-like input into a decoded RGB ``PIL.Image`` (see ``ACCEPTED_TYPES``).

    File paths are opened lazily and their declared size is checked against ``max_image_pixels``
    before any pixel is decoded. Raises ``TypeError`` for non-images and ``ValueError`` for empty,
    corrupt, truncated, zero-size or oversized images.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No image file at {path!r} (URLs are not fetched; download the image first).")
        try:
            opened = Image.open(path)  # reads the header only
        except Image.DecompressionBombError as err:
            raise ValueError(
                f"PIL refused to open {path!r}: {err} If you trust the file, raise PIL.Image.MAX_IMAGE_PIXELS as well "
                "as this processor's max_image_pixels."
            ) from err
        except Exception as err:  # UnidentifiedImageError (empty or not an image), corrupt header, ...
            raise ValueError(f"Could not read the image file {path!r} (empty or not an image): {err}") from err
        with opened:
            _check_pixels(*opened.size, max_image_pixels, what=f"image file {path!r}")
            try:
                # Decode inside the try: truncated or corrupt data raises here (as long as nobody set
                # PIL.ImageFile.LOAD_TRUNCATED_IMAGES = True, which pads truncated images silently).
                opened.load()
                rgb = _to_rgb(opened)
            except Exception as err:  # OSError("image file is truncated"), SyntaxError, zlib errors, ...
                raise ValueError(f"Could not decode the image file {path!r} (truncated or corrupt): {err}") from err
            return rgb.copy() if rgb is opened else rgb  # closing `opened` frees its pixels

    if isinstance(image, Image.Image):
        _check_pixels(*image.size, max_image_pixels)
        try:
            image.load()
            return _to_rgb(image)
        except (OSError, SyntaxError, AssertionError) as err:  # AssertionError: its file was closed already
            name = getattr(image, "filename", "") or "PIL image"
            raise ValueError(f"Could not decode {name!r} (truncated, corrupt, or its file closed): {err!r}") from err

    if isinstance(image, np.ndarray):
        array, layout = image, "HWC"
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        array, layout = tensor.numpy(), "CHW"
    else:
        raise TypeError(f"Expected an image: {ACCEPTED_TYPES}; got {_type_name(image)}.")
    if array.ndim == 2:
        height, width = array.shape
    elif array.ndim == 3:
        channels_first = layout == "CHW" and array.shape[0] in (1, 3, 4)
        channels_first |= layout == "HWC" and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4)
        height, width = array.shape[1:] if channels_first else array.shape[:2]
    else:
        raise ValueError(f"Cannot read an image from an array of shape {tuple(array.shape)}: expected 2 or 3 dims.")
    _check_pixels(width, height, max_image_pixels)
    return _array_to_pil(array, layout).convert("RGB")


def _type_name(x):
    return f"{type(x).__module__}.{type(x).__qualname__}"


def _batch_structure(images):
    """Nest the input as a list per sample of lists of images."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)  # (N, ...) = one image per sample
    if not isinstance(images, (list, tuple)):
        return [[images]]
    nested = [isinstance(x, (list, tuple)) for x in images]
    if all(nested):
        return [list(sample) for sample in images]
    if any(nested):
        raise ValueError("Give a flat list of images (one per sample) or a list of lists (per sample), not a mix.")
    return [[image] for image in images]


# ---------------------------------------------------------------------------------------------
# The image processor
# ---------------------------------------------------------------------------------------------


SETTING_NAMES = (
    "image_size", "slice_mode", "max_slice_nums", "scale_resolution", "patch_size", "never_split",
    "image_mean", "image_std", "max_image_pixels",
)


@functools.lru_cache(maxsize=8)
def _normalization_table(mean, std):
    """`(3, 256)` float32: ToTensor() then Normalize(mean, std) of every uint8 value, computed with the same
    float32 ops in the same order (hence the same bits)."""
    table = torch.arange(256).to(torch.float32).div(255).expand(3, 256).clone()
    table.sub_(torch.tensor(mean, dtype=torch.float32).view(3, 1)).div_(torch.tensor(std, dtype=torch.float32).view(3, 1))
    return table.numpy()


class OmniLMMImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    slice_mode: bool
    max_slice_nums: int
    scale_resolution: int
    patch_size: int
    never_split: bool
    max_image_pixels: int | None


class OmniLMMImageProcessor(BaseImageProcessor):
    r"""OmniLMM / MiniCPM-V image processor.

    Args:
        image_size (`int`, defaults to 448): side of the square-mode output.
        slice_mode (`bool`, defaults to `False`): MiniCPM-V slicing instead of one square image.
        max_slice_nums (`int`, defaults to 9): most tiles per image in slice mode (1 = never slice).
        scale_resolution (`int`, defaults to 448): target side of the source image and of every tile.
        patch_size (`int`, defaults to 14): every slice-mode size is a multiple of it.
        never_split (`bool`, defaults to `False`): slice mode, but never cut into tiles.
        image_mean, image_std: per-channel normalisation (OpenAI CLIP).
        max_image_pixels (`int` or `None`, defaults to 100,000,000): larger images are refused before
            decoding (decompression-bomb guard); `None` disables the check. Slice mode also refuses images
            thinner than 1:`MAX_ASPECT_RATIO` (1000), whose views would grow without bound.

    Calling it returns a `BatchFeature` with `pixel_values` (a list per sample of lists of float32
    `(3, H, W)` tensors: per image, the source then the tiles row by row), `image_sizes` (the
    originals' `(w, h)`) and `slice_grids` (`(cols, rows)`, or `None` when an image is not sliced).
    An image takes `1 + cols * rows` image spans.
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = OmniLMMImageProcessorKwargs

    # Class defaults, so that `to_dict` keeps explicit `None`s (e.g. max_image_pixels=None).
    image_size = 448
    slice_mode = False
    max_slice_nums = 9
    scale_resolution = 448
    patch_size = 14
    never_split = False
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(
        self,
        image_size: int = 448,
        slice_mode: bool = False,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        never_split: bool = False,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = image_size
        self.slice_mode = slice_mode
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.never_split = never_split
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.max_image_pixels = max_image_pixels
        self._settings()  # validates

    def _settings(self, **overrides):
        """This processor's settings, with the non-`None` per-call `overrides` applied and checked."""
        settings = {key: getattr(self, key) for key in SETTING_NAMES}
        settings.update({key: value for key, value in overrides.items() if value is not None})
        max_slice_nums = settings["max_slice_nums"]
        if not isinstance(max_slice_nums, (int, np.integer)) or isinstance(max_slice_nums, bool) or max_slice_nums < 1:
            raise ValueError(f"max_slice_nums must be an integer >= 1 (1 = never slice), got {max_slice_nums!r}.")
        for name in ("image_size", "scale_resolution", "patch_size"):
            value = settings[name]
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        mean, std = settings["image_mean"], settings["image_std"]
        if np.size(mean) != 3 or np.size(std) != 3 or not np.all(np.asarray(std) != 0):
            raise ValueError(f"image_mean and image_std must be 3 numbers (std non-zero), got {mean!r} and {std!r}.")
        return settings

    def slice_grid(self, image_size, **overrides):
        """The `(cols, rows)` grid of an image of `image_size = (w, h)`, or `None` when it is not sliced.

        The image then takes `1 + cols * rows` image spans (the source, then the tiles row by row).
        """
        s = self._settings(**overrides)
        if not s["slice_mode"]:
            return None
        layout = slice_layout(image_size, s["max_slice_nums"], s["scale_resolution"], s["patch_size"], s["never_split"])
        return layout[1]

    @staticmethod
    def _normalize(image, mean, std):
        """RGB PIL image (w, h), or its `(h, w, 3)` uint8 pixels -> float32 tensor (3, h, w), bit for bit
        ToTensor() then Normalize(mean, std).

        A uint8 channel has 256 values: the float32 ops (`/ 255`, `- mean`, `/ std`, in that order) run once on a
        256-entry table per channel and every pixel looks its value up (one pass, no float temporaries)."""
        pixels = np.asarray(image, dtype=np.uint8)
        table = _normalization_table(tuple(mean), tuple(std))
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(table[channel], pixels[..., channel], out=out[channel])
        return torch.from_numpy(out)

    def _process_one(self, image, s):
        """RGB PIL image -> (list of (3, H, W) tensors: source then tiles row by row, grid or None)."""
        mean, std = s["image_mean"], s["image_std"]
        if not s["slice_mode"]:
            square = image.resize((s["image_size"], s["image_size"]), Image.Resampling.BICUBIC)
            return [self._normalize(square, mean, std)], None
        source_size, grid, tile_size = slice_layout(
            image.size, s["max_slice_nums"], s["scale_resolution"], s["patch_size"], s["never_split"]
        )
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise ValueError(
                f"The image is {image.width}x{image.height}, thinner than 1:{MAX_ASPECT_RATIO}: slice mode would make "
                f"a {source_size[0]}x{source_size[1]} view of it. Crop or pad it first (or use square mode)."
            )
        if grid is None:
            return [self._normalize(image.resize(source_size, Image.Resampling.BICUBIC), mean, std)], None
        (cols, rows), (tile_w, tile_h) = grid, tile_size
        # Both resizes read the original; PIL releases the GIL while resampling, so they run side by side. (A pool
        # per call, not a module-level one: a module-level pool is dead in processes forked by DataLoader workers.)
        with ThreadPoolExecutor(max_workers=1) as pool:
            source = pool.submit(image.resize, source_size, Image.Resampling.BICUBIC)
            refined = np.asarray(image.resize((cols * tile_w, rows * tile_h), Image.Resampling.BICUBIC))
            tensors = [self._normalize(source.result(), mean, std)]
        # Cut the tiles (row by row) out of the uint8 pixels and normalise each straight into its own tensor.
        for row in range(rows):
            for col in range(cols):
                tile = refined[row * tile_h : (row + 1) * tile_h, col * tile_w : (col + 1) * tile_w]
                tensors.append(self._normalize(tile, mean, std))
        return tensors, grid

    def preprocess(
        self,
        images,
        slice_mode: bool | None = None,
        max_slice_nums: int | None = None,
        never_split: bool | None = None,
        return_tensors=None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Preprocess one image, a flat list of images (one per sample) or a list of lists (per sample).

        Any setting of `__init__` can be overridden for this call (`None` = the processor's own).
        Returns a `BatchFeature` with `pixel_values`, `image_sizes` and `slice_grids` (see the class
        docstring); the lists stay lists (the tensors of a sample may differ in size). `return_tensors`
        may be `None` or `"pt"` (torch tensors) or `"np"` (numpy arrays).
        """
        overrides = {key: kwargs.pop(key, None) for key in SETTING_NAMES if key in kwargs}
        s = self._settings(slice_mode=slice_mode, max_slice_nums=max_slice_nums, never_split=never_split, **overrides)
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}.")
        unused = sorted(key for key, value in kwargs.items() if value is not None)
        if unused:
            logger.warning_once(f"OmniLMMImageProcessor.preprocess ignores the arguments {unused}.")

        pixel_values, image_sizes, slice_grids = [], [], []
        for sample in _batch_structure(images):
            sample_pixels, sample_sizes, sample_grids = [], [], []
            for image in sample:
                rgb = load_image(image, s["max_image_pixels"])  # TypeError / ValueError on bad input
                tensors, grid = self._process_one(rgb, s)
                if return_tensors == "np":
                    tensors = [t.numpy() for t in tensors]
                sample_pixels.extend(tensors)
                sample_sizes.append(rgb.size)
                sample_grids.append(grid)
            pixel_values.append(sample_pixels)
            image_sizes.append(sample_sizes)
            slice_grids.append(sample_grids)
        # tensor_type=None: BatchFeature must not try to stack these ragged lists.
        data = {"pixel_values": pixel_values, "image_sizes": image_sizes, "slice_grids": slice_grids}
        return BatchFeature(data=data, tensor_type=None)


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "OmniLMMImageProcessor", "load_image", "slice_layout"]
