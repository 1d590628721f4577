# Copyright 2026 The omnilmm-hf authors. Licensed under the Apache License, Version 2.0.
"""OmniLMM (square mode) and MiniCPM-V (slice mode) image processors, a transformers 5 backend pair:
`OmniLMMImageProcessor` (PIL, what saved folders load) is bit for bit the original (PIL bicubic, then ToTensor() +
Normalize()); `OmniLMMImageProcessorFast` (torchvision: antialiased bicubic on uint8 tensors, optionally on `device`)
has the same geometry and normalisation, its resized pixels differing from PIL's by a few uint8 levels."""

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as tvF

from transformers.image_processing_backends import PilBackend, TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling  # noqa: F401 - ImagesKwargs' type hints need it (vLLM)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


logger = logging.get_logger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Slice mode refuses thinner images: up to this ratio a view has at most about (scale_resolution / patch_size)**2
# patches; beyond, the short side stays one patch and the long side grows (1 x 100,000,000: a 320,000-patch view).
MAX_ASPECT_RATIO = 1000
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")  # a path that names a video, not an image
NORM_NAMES = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
SLICE_NAMES = ("max_slice_nums", "scale_resolution", "patch_size", "never_split")
SETTING_NAMES = ("image_size", "slice_mode", *SLICE_NAMES, "max_image_pixels", *NORM_NAMES)


def _ensure_divide(length, patch_size):
    return max(round(length / patch_size) * patch_size, patch_size)


def _find_best_resize(size, scale_resolution, patch_size, allow_upscale=False):
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return _ensure_divide(width, patch_size), _ensure_divide(height, patch_size)


def _is_count(value, minimum=1):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def slice_layout(image_size, max_slice_nums=9, scale_resolution=448, patch_size=14, never_split=False):
    """MiniCPM-V's slicing geometry for an image of `image_size = (width, height)`: `(source_size, grid, slice_size)`,
    the `(w, h)` of the overview, the `(cols, rows)` grid and every tile's `(w, h)` (both None when not sliced)."""
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise TypeError(f"slice_layout needs image_size = (width, height), got {image_size!r}.") from None
    checks = (("width", width), ("height", height), ("scale_resolution", scale_resolution), ("patch_size", patch_size))
    for name, value in checks:
        if not _is_count(value):
            raise ValueError(f"slice_layout needs a positive integer {name}, got {value!r}.")
    if not _is_count(max_slice_nums):
        raise ValueError(f"max_slice_nums must be an integer >= 1 (1 = never slice), got {max_slice_nums!r}.")
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1 or never_split:
        return _find_best_resize((width, height), scale_resolution, patch_size, allow_upscale=True), None, None
    source_size = _find_best_resize((width, height), scale_resolution, patch_size)
    # Candidates: the (cols, rows) factor pairs of multiple-1, multiple, multiple+1 (not 1, <= max_slice_nums).
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [(cols, n // cols) for n in counts for cols in range(1, n + 1) if n % cols == 0]
    log_ratio = math.log(width / height)
    cols, rows = min(candidates, key=lambda grid: abs(log_ratio - math.log(grid[0] / grid[1])))  # first minimum
    cell = (_ensure_divide(width, cols) / cols, _ensure_divide(height, rows) / rows)
    return source_size, (cols, rows), _find_best_resize(cell, scale_resolution, patch_size, allow_upscale=True)


def num_views(grid) -> int:
    """The views (spans) of an image sliced to `grid` (`(cols, rows)`: the overview and its tiles; None: one view)."""
    return 1 + (grid[0] * grid[1] if grid else 0)


def _check_pixels(width, height, max_image_pixels, what="image"):
    if width <= 0 or height <= 0:
        raise ValueError(f"The {what} has zero size ({width}x{height}).")
    if max_image_pixels is not None and width * height > max_image_pixels:
        raise ValueError(
            f"The {what} is {width}x{height} = {width * height:,} pixels, more than max_image_pixels="
            f"{max_image_pixels:,} (a guard against decompression bombs). If you trust it, raise the limit: "
            "`OmniLMMImageProcessor(max_image_pixels=...)` or `image_processor.max_image_pixels = ...` "
            "(None disables the check).")


def _array_to_pil(array):
    """`array`: numpy HWC or HW; uint8, ints in [0, 255], bool or floats in [0, 1]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"Cannot read an image from an array of shape {tuple(array.shape)}: expected HW, HWC "
                         "(numpy) or CHW (torch) with 1, 3 or 4 channels.")
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
    """EXIF orientation applied (as viewers and transformers do), `convert("RGB")`; 16-bit and float modes scaled."""
    if image.getexif().get(0x0112, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image, scale = image.convert("I"), 1 / 257  # 0..65535 -> 0..255
    elif image.mode == "I":
        scale = 1 / 257 if image.getextrema()[1] > 255 else 1
    elif image.mode == "F":
        scale = 255 if image.getextrema()[0] >= 0 and image.getextrema()[1] <= 1 else 1
    else:
        if image.mode in ("La", "PA"):  # PIL converts premultiplied La to LA only
            image = image.convert("LA" if image.mode == "La" else "RGBA")
        return image.convert("RGB")
    values = np.rint(np.clip(np.asarray(image, dtype=np.float64) * scale, 0, 255)).astype(np.uint8)
    return Image.fromarray(values).convert("RGB")


def _load_file(path, max_image_pixels):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No image file at {path!r} (URLs are not fetched; download the image first).")
    try:
        opened = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ValueError(f"PIL refused to open {path!r}: {err} If you trust the file, raise "
                         "PIL.Image.MAX_IMAGE_PIXELS as well as this processor's max_image_pixels.") from err
    except Exception as err:  # UnidentifiedImageError (empty or not an image), corrupt header, ...
        video = " It looks like a video: give it as a video." if path.lower().endswith(VIDEO_SUFFIXES) else ""
        raise ValueError(f"Could not read the image file {path!r} (empty or not an image): {err}{video}") from err
    with opened:
        _check_pixels(*opened.size, max_image_pixels, what=f"image file {path!r}")
        try:
            opened.load()  # truncated or corrupt data raises here (unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES)
            rgb = _to_rgb(opened)
        except Exception as err:  # OSError("image file is truncated"), SyntaxError, zlib errors, ...
            raise ValueError(f"Could not decode the image file {path!r} (truncated or corrupt): {err}") from err
        return rgb.copy() if rgb is opened else rgb  # closing `opened` frees its pixels


def load_image(image, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS):
    """A PIL image, numpy array (HWC or HW), torch tensor (CHW or HW) or file path -> a decoded, upright RGB PIL image.
    A file's declared size is checked against `max_image_pixels` before decoding."""
    if isinstance(image, (str, os.PathLike)):
        return _load_file(os.fspath(image), max_image_pixels)
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
        array, layout = (tensor.float() if tensor.is_floating_point() else tensor).numpy(), "CHW"
    else:
        kind = f"{type(image).__module__}.{type(image).__qualname__}"
        raise TypeError(f"Expected an image: a PIL.Image.Image, a numpy array (HWC or HW), a torch tensor (CHW or HW) "
                        f"or a file path (str or os.PathLike); got {kind}.")
    if array.ndim not in (2, 3):
        raise ValueError(f"Cannot read an image from an array of shape {tuple(array.shape)}: expected 2 or 3 dims.")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and (layout == "CHW" or array.shape[-1] not in (1, 3, 4)):
        array = array.transpose(1, 2, 0)  # channels first
    _check_pixels(array.shape[1], array.shape[0], max_image_pixels)
    return _array_to_pil(array).convert("RGB")


def _batch_structure(images):
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


def _normalize_tensor(pixels, s):
    """uint8 `(..., 3, h, w)` -> float32: `* rescale_factor` (as `/ 255` when it is 1/255, like `ToTensor()`)
    if `do_rescale`, then `- mean`, `/ std` if `do_normalize`, in float32 in that order."""
    out = pixels.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if s["do_rescale"]:
        out = out.div_(255) if s["rescale_factor"] == 1 / 255 else out.mul_(s["rescale_factor"])
    if s["do_normalize"]:
        mean, std = (torch.tensor(s[k], dtype=torch.float32, device=out.device).view(3, 1, 1) for k in NORM_NAMES[3:])
        out = out.sub_(mean).div_(std)
    return out


@functools.lru_cache(maxsize=8)
def _normalization_table(*settings):
    """`(3, 256)` float32: `_normalize_tensor` of every uint8 value (same float32 ops, hence the same bits)."""
    values = torch.arange(256, dtype=torch.uint8).expand(3, 1, 256)
    return _normalize_tensor(values, dict(zip(NORM_NAMES, settings))).view(3, 256)


def _normalize_array(table, pixels):
    """`(h, w, 3)` uint8 pixels (or an RGB PIL image) -> float32 `(3, h, w)`, one table look-up per pixel."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for channel in range(3):
        np.take(table[channel], pixels[..., channel], out=out[channel])
    return torch.from_numpy(out)


class OmniLMMImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    slice_mode: bool
    max_slice_nums: int
    scale_resolution: int
    patch_size: int
    never_split: bool
    max_image_pixels: int | None


class _OmniLMMImageProcessorMixin:
    r"""OmniLMM / MiniCPM-V image processor; every setting (the class attributes below) can be overridden per call.

    `image_size`: the square-mode side; `slice_mode`: MiniCPM-V slicing (`slice_layout`) instead of one square image;
    `max_image_pixels` (None = no limit): larger images are refused before decoding. Returns a `BatchFeature`:
    `pixel_values` (a list per sample of lists of float32 `(3, H, W)` tensors: per image, the source then the tiles row
    by row), `image_sizes` (the originals' `(w, h)`), `slice_grids` (`(cols, rows)`, or None when not sliced)."""

    model_input_names = ["pixel_values"]
    valid_kwargs = OmniLMMImageProcessorKwargs
    setting_names = SETTING_NAMES
    # Class defaults (`to_dict` keeps an explicit `None` only where the class default is not `None`).
    image_size, slice_mode, max_slice_nums, scale_resolution, patch_size, never_split = 448, False, 9, 448, 14, False
    do_rescale, rescale_factor, do_normalize = True, 1 / 255, True
    image_mean, image_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS

    def __init__(self, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, **kwargs):
        super().__init__(**kwargs)  # the backend sets every valid kwarg: the given value or the class default
        self.max_image_pixels = max_image_pixels  # (there, None would mean "the default", not "no limit")
        self._settings()  # validates

    def _settings(self, **overrides):
        s = {key: getattr(self, key) for key in self.setting_names}
        s.update({key: value for key, value in overrides.items() if value is not None})
        for name in ("max_slice_nums", "image_size", "scale_resolution", "patch_size"):
            if not _is_count(s[name]):
                what = "an integer >= 1 (1 = never slice)" if name == "max_slice_nums" else "a positive integer"
                raise ValueError(f"{name} must be {what}, got {s[name]!r}.")
        mean, std, factor = s["image_mean"], s["image_std"], s["rescale_factor"]
        if np.size(mean) != 3 or np.size(std) != 3 or not np.all(np.asarray(std) != 0):
            raise ValueError(f"image_mean and image_std must be 3 numbers (std non-zero), got {mean!r} and {std!r}.")
        number = isinstance(factor, (int, float, np.number)) and not isinstance(factor, bool)
        if not (number and math.isfinite(factor) and factor != 0):
            raise ValueError(f"rescale_factor must be a non-zero number, got {factor!r}.")
        s["image_mean"], s["image_std"] = (tuple(float(x) for x in np.ravel(v)) for v in (mean, std))
        s.update(rescale_factor=float(factor), do_rescale=bool(s["do_rescale"]), do_normalize=bool(s["do_normalize"]))
        return s

    def slice_grid(self, image_size, **overrides):
        """The `(cols, rows)` grid of an image of `image_size = (w, h)` (it takes `num_views(grid)` spans) or None."""
        s = self._settings(**overrides)
        if not s["slice_mode"]:
            return None
        return slice_layout(image_size, *(s[key] for key in SLICE_NAMES))[1]

    @staticmethod
    def _layout(size, s):
        """`(first resize (w, h), grid, tile (w, h))` for an image of `size`: a square, or `slice_layout`'s."""
        if not s["slice_mode"]:
            return (s["image_size"], s["image_size"]), None, None
        layout = slice_layout(size, *(s[key] for key in SLICE_NAMES))
        if max(size) > MAX_ASPECT_RATIO * min(size):
            raise ValueError(f"The image is {size[0]}x{size[1]}, thinner than 1:{MAX_ASPECT_RATIO}: slice mode would "
                             f"make a {layout[0][0]}x{layout[0][1]} view of it. Crop or pad it first (or use square "
                             "mode).")
        return layout

    def preprocess(self, images, return_tensors=None, **kwargs: Any) -> BatchFeature:
        """One image, a flat list (one image per sample) or a list of lists (per sample); settings as keywords (None =
        the processor's own). The lists stay lists; `return_tensors`: None or "pt" (torch tensors) or "np" (numpy)."""
        s = self._settings(**{key: kwargs.pop(key) for key in self.setting_names if key in kwargs})
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}.")
        unused = sorted(key for key, value in kwargs.items() if value is not None)
        if unused:
            logger.warning_once(f"{type(self).__name__}.preprocess ignores the arguments {unused}.")
        data = {"pixel_values": [], "image_sizes": [], "slice_grids": []}
        for sample in _batch_structure(images):
            pixels, sizes, grids = [], [], []
            for image in sample:
                rgb = load_image(image, s["max_image_pixels"])  # TypeError / ValueError on bad input
                tensors, grid = self._process_one(rgb, s)
                pixels.extend([t.cpu().numpy() for t in tensors] if return_tensors == "np" else tensors)
                sizes.append(rgb.size)
                grids.append(grid)
            for key, value in zip(data, (pixels, sizes, grids)):
                data[key].append(value)
        return BatchFeature(data=data, tensor_type=None)  # None: BatchFeature must not stack these ragged lists


class OmniLMMImageProcessor(_OmniLMMImageProcessorMixin, PilBackend):
    __doc__ = _OmniLMMImageProcessorMixin.__doc__ + "\n    PIL backend: bit-exact to the original (PIL bicubic).\n"

    def _process_one(self, image, s):
        """RGB PIL image -> (list of (3, H, W) tensors: source then tiles row by row, grid or None)."""
        table = _normalization_table(*(s[key] for key in NORM_NAMES)).numpy()
        source_size, grid, tile_size = self._layout(image.size, s)
        if grid is None:
            return [_normalize_array(table, image.resize(source_size, Image.Resampling.BICUBIC))], None
        (cols, rows), (w, h) = grid, tile_size
        # Both resizes read the original and PIL releases the GIL: they run side by side (a pool per call: a
        # module-level pool would be dead in processes forked by DataLoader workers).
        with ThreadPoolExecutor(max_workers=1) as pool:
            source = pool.submit(image.resize, source_size, Image.Resampling.BICUBIC)
            refined = np.asarray(image.resize((cols * w, rows * h), Image.Resampling.BICUBIC))
            tensors = [_normalize_array(table, source.result())]
        # Cut the tiles (row by row) out of the uint8 pixels and normalise each straight into its own tensor.
        tiles = [refined[r * h : (r + 1) * h, c * w : (c + 1) * w] for r, c in np.ndindex(rows, cols)]
        return tensors + [_normalize_array(table, tile) for tile in tiles], grid


class OmniLMMImageProcessorFast(_OmniLMMImageProcessorMixin, TorchvisionBackend):
    __doc__ = _OmniLMMImageProcessorMixin.__doc__ + "\n    Torchvision backend (antialiased bicubic), on `device`.\n"
    setting_names = (*SETTING_NAMES, "device")

    def _process_one(self, image, s):
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).to(s["device"])  # uint8 (3, h, w)
        resize = functools.partial(tvF.resize, pixels, interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        (source_w, source_h), grid, tile_size = self._layout(image.size, s)
        tensors = [_normalize_tensor(resize([source_h, source_w]), s)]
        if grid is None:
            return tensors, None
        (cols, rows), (w, h) = grid, tile_size
        # All tiles in one pass (few big ops): (3, rows*h, cols*w) -> (rows, cols, 3, h, w), row by row.
        tiles = _normalize_tensor(resize([rows * h, cols * w]).view(3, rows, h, cols, w).permute(1, 3, 0, 2, 4), s)
        return tensors + list(tiles.flatten(0, 1).unbind(0)), grid


__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "OmniLMMImageProcessor", "OmniLMMImageProcessorFast", "load_image",
           "slice_layout"]
