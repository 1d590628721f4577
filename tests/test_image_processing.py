"""OmniLMMImageProcessor and slice_layout against the original code's outputs (shared/fixtures)."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

from omnilmm_tools.remote import remote_module


ip = remote_module("image_processing_omnilmm")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = FIXTURES / "omnilmm-tiny-original"
IMAGES = TINY / "images"
PHOTO = IMAGES / "photo_640x480.png"
BIG = IMAGES / "photo_1344x1008.png"
GRAY = IMAGES / "small_120x90_gray.png"
RGBA = IMAGES / "tall_300x800_rgba.png"

# The original's published constants (OpenAI CLIP), written out here rather than taken from the module.
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.fixture(scope="module", autouse=True)
def _fixtures_present():
    assert TINY.is_dir(), f"reference fixtures not found at {TINY}"


def reference_tensor(png):
    """An expected PNG as the original's pixel_values: ToTensor (u8 / 255) then Normalize, float32, CHW."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / np.float32(255)
    return torch.from_numpy(((pixels - MEAN) / STD).transpose(2, 0, 1).copy())


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def slicing_cases():
    data = json.loads((TINY / "slicing.json").read_text())
    assert data["scale_resolution"] == 448 and data["patch_size"] == 14
    return data["cases"]


def random_image(size, seed=0):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_with_header(path, width, height, idat=b"\x00" * 30):
    """A PNG whose IHDR declares width x height but whose data is (almost) nothing."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(idat)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


# ---------------------------------------------------------------------------------------------
# 1. slicing geometry
# ---------------------------------------------------------------------------------------------


def test_slice_layout_matches_all_original_cases():
    cases = slicing_cases()
    assert len(cases) == 320
    assert {(c["max_slice_nums"], c["never_split"]) for c in cases} == {(9, False), (4, False), (1, False), (9, True)}
    mismatches = []
    for case in cases:
        source, grid, slice_size = ip.slice_layout(
            tuple(case["size"]), max_slice_nums=case["max_slice_nums"], scale_resolution=448, patch_size=14,
            never_split=case["never_split"],
        )
        if case["grid"] is None:
            slices = []
            ok = grid is None and slice_size is None
        else:
            slices = [list(slice_size)] * (grid[0] * grid[1])
            ok = list(grid) == case["grid"]
        ok = ok and list(source) == case["source_size"] and slices == case["slice_sizes"]
        if not ok:
            mismatches.append((case, (source, grid, slice_size)))
    assert not mismatches, f"{len(mismatches)} of 320 cases differ, e.g. {mismatches[:3]}"
    assert sum(c["grid"] is not None for c in cases) > 100  # the fixture really exercises slicing


@pytest.mark.parametrize(
    "size, max_slice_nums, never_split",
    [((1, 1), 9, False), ((66, 31), 9, False), ((896, 448), 9, False), ((10000, 50), 9, False),
     ((1920, 1080), 4, False), ((1024, 768), 1, False), ((800, 3000), 9, False), ((2721, 749), 9, True)],
)
def test_slice_mode_tensor_shapes_follow_original_geometry(size, max_slice_nums, never_split):
    (case,) = [
        c for c in slicing_cases()
        if tuple(c["size"]) == size and c["max_slice_nums"] == max_slice_nums and c["never_split"] == never_split
    ]
    processor = ip.OmniLMMImageProcessor(slice_mode=True)
    out = processor(random_image(size), max_slice_nums=max_slice_nums, never_split=never_split)
    tensors = out["pixel_values"][0]
    expected_hw = [case["source_size"][::-1]] + [s[::-1] for s in case["slice_sizes"]]
    assert [list(t.shape) for t in tensors] == [[3, *hw] for hw in expected_hw]
    assert all(t.dtype == torch.float32 for t in tensors)
    assert out["slice_grids"] == [[tuple(case["grid"]) if case["grid"] else None]]
    assert out["image_sizes"] == [[size]]


def test_slice_layout_ties_go_to_the_first_candidate_grid():
    # A square image just above one tile: 1x2 and 2x1 are equally far from its aspect ratio; the
    # original keeps the first minimum in its candidate order (count, then columns), i.e. 1 column.
    assert ip.slice_layout((600, 600))[1] == (1, 2)
    assert ip.slice_layout((500, 500))[1] == (1, 2)


def test_slice_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_slice_nums"):
        ip.slice_layout((100, 100), max_slice_nums=0)
    for bad in [(0, 10), (10, 0), (-5, 10)]:
        with pytest.raises(ValueError, match="positive"):
            ip.slice_layout(bad)
    with pytest.raises(ValueError, match="patch_size"):
        ip.slice_layout((100, 100), patch_size=0)


# ---------------------------------------------------------------------------------------------
# 2./3. pixels: slice mode and square mode reproduce the original's PIL outputs
# ---------------------------------------------------------------------------------------------


def test_slice_mode_reproduces_original_slices():
    out = ip.OmniLMMImageProcessor(slice_mode=True)(BIG)
    assert out["slice_grids"] == [[(3, 2)]]
    assert out["image_sizes"] == [[(1344, 1008)]]
    sliced = IMAGES / "photo_1344x1008.sliced"
    expected = [sliced / "source.png"] + [sliced / f"slice_{i}.png" for i in range(6)]
    tensors = out["pixel_values"][0]
    assert len(tensors) == len(expected) == 7
    for tensor, png in zip(tensors, expected):
        assert max_diff(tensor, reference_tensor(png)) <= 1e-6, png.name


@pytest.mark.parametrize("name", ["photo_640x480", "small_120x90_gray", "tall_300x800_rgba"])
def test_square_mode_reproduces_original_resize(name):
    source = IMAGES / f"{name}.png"
    out = ip.OmniLMMImageProcessor()(source)
    (tensor,) = out["pixel_values"][0]
    assert tensor.shape == (3, 448, 448) and tensor.dtype == torch.float32
    assert max_diff(tensor, reference_tensor(IMAGES / f"{name}.resized.png")) <= 1e-6
    assert out["slice_grids"] == [[None]]
    assert out["image_sizes"] == [[Image.open(source).size]]


def test_normalisation_is_bit_exact_with_torchvision():
    transforms = pytest.importorskip("torchvision.transforms")
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN.tolist(), STD.tolist())])
    square = transforms.Compose([
        transforms.Resize((448, 448), interpolation=transforms.InterpolationMode.BICUBIC), to_tensor,
    ])
    rgb = Image.open(RGBA).convert("RGB")
    assert torch.equal(ip.OmniLMMImageProcessor()(RGBA)["pixel_values"][0][0], square(rgb))
    source = ip.OmniLMMImageProcessor(slice_mode=True)(BIG)["pixel_values"][0][0]
    assert torch.equal(source, to_tensor(Image.open(IMAGES / "photo_1344x1008.sliced" / "source.png").convert("RGB")))


def test_fixture_inputs_cover_rgb_rgba_and_grayscale():
    assert {Image.open(p).mode for p in (PHOTO, RGBA, GRAY)} == {"RGB", "RGBA", "L"}


# ---------------------------------------------------------------------------------------------
# 4. input types and batch structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slice_mode", [False, True])
def test_input_types_give_identical_tensors(slice_mode):
    processor = ip.OmniLMMImageProcessor(slice_mode=slice_mode)
    pil = Image.open(PHOTO)
    hwc = np.asarray(pil.convert("RGB"))
    chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1)
    inputs = {
        "pil": pil, "numpy_hwc": hwc, "torch_chw": chw, "torch_float": chw.float() / 255,
        "str": str(PHOTO), "path": PHOTO,
    }
    results = {k: processor(v)["pixel_values"][0] for k, v in inputs.items()}
    reference = results.pop("path")
    assert len(reference) == (3 if slice_mode else 1)  # 640x480 is sliced in two tiles
    for name, tensors in results.items():
        assert len(tensors) == len(reference), name
        assert all(torch.equal(a, b) for a, b in zip(tensors, reference)), name


def test_grayscale_and_alpha_inputs():
    processor = ip.OmniLMMImageProcessor()
    gray = Image.open(GRAY)
    by_path = processor(GRAY)["pixel_values"][0][0]
    assert torch.equal(processor(np.asarray(gray))["pixel_values"][0][0], by_path)  # numpy HW
    assert torch.equal(processor(torch.from_numpy(np.asarray(gray).copy()))["pixel_values"][0][0], by_path)
    assert torch.equal(processor(np.asarray(gray)[..., None])["pixel_values"][0][0], by_path)  # HW1
    rgba = Image.open(RGBA)
    assert torch.equal(processor(np.asarray(rgba))["pixel_values"][0][0], processor(RGBA)["pixel_values"][0][0])


def test_other_pil_modes_convert_sensibly():
    processor = ip.OmniLMMImageProcessor()
    levels = np.random.default_rng(1).integers(0, 256, (40, 60), dtype=np.uint8)
    expected = processor(Image.fromarray(levels, "L"))["pixel_values"][0][0]
    same = {
        "I;16": Image.fromarray(levels.astype(np.uint16) * 257),  # 16-bit: scaled down, not clipped at 255
        "I": Image.fromarray(levels.astype(np.int32) * 257),
        "F": Image.fromarray(levels.astype(np.float32) / 255),  # floats in [0, 1]
        "LA": Image.fromarray(levels, "L").convert("LA"),
        "P": Image.fromarray(levels, "L").convert("P"),
    }
    for mode, image in same.items():
        assert image.mode == mode
        assert torch.equal(processor(image)["pixel_values"][0][0], expected), mode
    cmyk = processor(Image.new("CMYK", (30, 20), (0, 0, 0, 0)))["pixel_values"][0][0]  # CMYK white
    assert torch.allclose(cmyk, torch.from_numpy((1 - MEAN) / STD).view(3, 1, 1).expand(3, 448, 448))


def test_batch_structure_sizes_and_grids():
    processor = ip.OmniLMMImageProcessor(slice_mode=True)
    out = processor([[BIG, GRAY], [], [RGBA]])
    assert set(out.keys()) == {"pixel_values", "image_sizes", "slice_grids"}
    assert out["image_sizes"] == [[(1344, 1008), (120, 90)], [], [(300, 800)]]
    rgba_grid = ip.slice_layout((300, 800))[1]
    assert out["slice_grids"] == [[(3, 2), None], [], [rgba_grid]]
    assert rgba_grid is not None
    # span order: per image, source then tiles row by row; 1 + cols * rows tensors per image.
    assert [len(s) for s in out["pixel_values"]] == [1 + 6 + 1, 0, 1 + rgba_grid[0] * rgba_grid[1]]
    big_alone = processor(BIG)["pixel_values"][0]
    assert all(torch.equal(a, b) for a, b in zip(out["pixel_values"][0][:7], big_alone))

    flat = processor([GRAY, PHOTO])  # a flat list: one image per sample
    assert [len(s) for s in flat["pixel_values"]] == [1, 3]
    assert flat["image_sizes"] == [[(120, 90)], [(640, 480)]]
    single = processor(GRAY)
    assert len(single["pixel_values"]) == 1 and single["image_sizes"] == [[(120, 90)]]

    # per-call overrides
    assert processor(BIG, max_slice_nums=1)["slice_grids"] == [[None]]
    assert processor(BIG, never_split=True)["slice_grids"] == [[None]]
    square = processor(BIG, slice_mode=False)
    assert square["slice_grids"] == [[None]] and square["pixel_values"][0][0].shape == (3, 448, 448)
    assert isinstance(processor(GRAY, return_tensors="np")["pixel_values"][0][0], np.ndarray)
    assert processor.slice_grid((1344, 1008)) == (3, 2)
    assert processor.slice_grid((1344, 1008), max_slice_nums=1) is None
    assert processor.slice_grid((1344, 1008), slice_mode=False) is None
    small = processor(GRAY, slice_mode=False, image_size=224, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    assert small["pixel_values"][0][0].shape == (3, 224, 224)
    assert 0 <= small["pixel_values"][0][0].min() and small["pixel_values"][0][0].max() <= 1

    with pytest.raises(ValueError, match="not a mix"):
        processor([GRAY, [GRAY]])


# ---------------------------------------------------------------------------------------------
# 5. bad input
# ---------------------------------------------------------------------------------------------


def test_pixel_limit_refuses_before_decoding(monkeypatch, tmp_path):
    decoded = []
    original_load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(self)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    processor = ip.OmniLMMImageProcessor(max_image_pixels=640 * 480 - 1)
    with pytest.raises(ValueError, match="640x480") as info:
        processor(PHOTO)
    assert "max_image_pixels" in str(info.value) and f"{640 * 480 - 1:,}" in str(info.value)
    assert decoded == []

    # A header that declares 10000x5000 over a few bytes of data: refused by size, not by truncation.
    bomb = png_with_header(tmp_path / "bomb.png", 10000, 5000)
    with pytest.raises(ValueError, match="10000x5000.*max_image_pixels"):
        ip.OmniLMMImageProcessor(max_image_pixels=10_000_000)(bomb)
    assert decoded == []

    monkeypatch.setattr(ImageFile.ImageFile, "load", original_load)
    processor.max_image_pixels = 640 * 480  # raising the limit lets it through
    assert processor(PHOTO)["pixel_values"][0][0].shape == (3, 448, 448)
    with pytest.raises(ValueError, match="max_image_pixels"):
        ip.OmniLMMImageProcessor(max_image_pixels=100)(Image.new("RGB", (20, 10)))  # in-memory images too


def test_not_an_image_is_a_type_error():
    processor = ip.OmniLMMImageProcessor()
    for bad in [3, {"a": 1}, None, 2.5, b"\x89PNG"]:
        with pytest.raises(TypeError, match=type(bad).__name__) as info:
            processor(bad)
        assert "PIL.Image.Image" in str(info.value) and "numpy" in str(info.value)
    with pytest.raises(TypeError):
        processor([[GRAY, None]])


def test_empty_truncated_and_corrupt_files(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    processor = ip.OmniLMMImageProcessor()
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.png"
    data = PHOTO.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image\n" * 20)
    no_data = png_with_header(tmp_path / "no_data.png", 64, 48, idat=b"")
    for path in (empty, truncated, not_image, no_data):
        with pytest.raises(ValueError) as info:
            processor(path)
        assert str(path) in str(info.value), info.value
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(tmp_path / "missing.png")


def test_zero_size_and_bad_settings():
    processor = ip.OmniLMMImageProcessor()
    for zero in [Image.new("RGB", (0, 10)), np.zeros((0, 5, 3), np.uint8), torch.zeros(3, 4, 0, dtype=torch.uint8)]:
        with pytest.raises(ValueError, match="zero size"):
            processor(zero)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="max_slice_nums"):
        processor(GRAY, slice_mode=True, max_slice_nums=0)
    with pytest.raises(ValueError, match="max_slice_nums"):
        ip.OmniLMMImageProcessor(max_slice_nums=0)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(GRAY, return_tensors="tf")


# ---------------------------------------------------------------------------------------------
# 6. serialisation
# ---------------------------------------------------------------------------------------------


SETTINGS = dict(image_size=224, slice_mode=True, max_slice_nums=4, scale_resolution=336, patch_size=16,
                never_split=True, max_image_pixels=None)


def test_save_and_load_round_trip(tmp_path):
    processor = ip.OmniLMMImageProcessor(**SETTINGS, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "OmniLMMImageProcessor"
    loaded = ip.OmniLMMImageProcessor.from_pretrained(tmp_path)
    for key, value in SETTINGS.items():
        assert getattr(loaded, key) == value, key
        assert saved[key] == value, key
    assert list(loaded.image_mean) == [0.5] * 3 and list(loaded.image_std) == [0.25] * 3
    assert loaded.to_dict() == processor.to_dict()
    assert ip.OmniLMMImageProcessor.from_pretrained(tmp_path, max_slice_nums=2).max_slice_nums == 2

    defaults = ip.OmniLMMImageProcessor()
    assert (defaults.image_size, defaults.slice_mode, defaults.max_slice_nums) == (448, False, 9)
    assert np.allclose(defaults.image_mean, MEAN) and np.allclose(defaults.image_std, STD)


def test_auto_image_processor_loads_remote_code(tmp_path):
    from transformers import AutoImageProcessor

    ip.OmniLMMImageProcessor(**SETTINGS).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["auto_map"] = {"AutoImageProcessor": "image_processing_omnilmm.OmniLMMImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    shutil.copy(ip.__file__, tmp_path / "image_processing_omnilmm.py")
    loaded = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "OmniLMMImageProcessor"
    assert all(getattr(loaded, k) == v for k, v in SETTINGS.items())
    out = loaded(GRAY)
    assert out["slice_grids"] == [[None]] and out["pixel_values"][0][0].shape[0] == 3


# ---------------------------------------------------------------------------------------------
# 7. the torchvision backend (OmniLMMImageProcessorFast) against the PIL one
# ---------------------------------------------------------------------------------------------

RAW = dict(do_rescale=False, do_normalize=False)  # the resized uint8 values, as float32 0..255


def raw_diff(image, slice_mode=True, **settings):
    """(max, mean) |Fast - PIL| in 0..255 units over every view; asserts the same structure."""
    pil = ip.OmniLMMImageProcessor(slice_mode=slice_mode, **settings)(image, **RAW)
    fast = ip.OmniLMMImageProcessorFast(slice_mode=slice_mode, **settings)(image, **RAW)
    assert fast["slice_grids"] == pil["slice_grids"] and fast["image_sizes"] == pil["image_sizes"]
    a, b = pil["pixel_values"][0], fast["pixel_values"][0]
    assert [t.shape for t in a] == [t.shape for t in b] and all(t.dtype == torch.float32 for t in b)
    d = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b)])
    return d.max().item(), d.mean().item()


@pytest.mark.parametrize(
    "size, max_slice_nums, never_split",
    [((1, 1), 9, False), ((66, 31), 9, False), ((896, 448), 9, False), ((10000, 50), 9, False),
     ((1920, 1080), 4, False), ((1024, 768), 1, False), ((800, 3000), 9, False), ((2721, 749), 9, True)],
)
def test_fast_geometry_equals_pil_geometry(size, max_slice_nums, never_split):
    # Uniform noise is the worst case for resamplers: measured max 20 levels (800x3000: PIL rounds its
    # intermediate pass to uint8, torchvision does not), mean <= 0.32; elsewhere max 2, mean < 0.01.
    biggest, mean = raw_diff(random_image(size), max_slice_nums=max_slice_nums, never_split=never_split)
    assert biggest <= 24 and mean <= 0.5


@pytest.mark.parametrize(
    "path, slice_mode", [(PHOTO, False), (GRAY, False), (RGBA, False), (BIG, True), (PHOTO, True)]
)
def test_fast_pixels_are_within_the_measured_bound_on_photos(path, slice_mode):
    # Measured on the fixture images: max 2 levels (11 on the RGBA one's edges), mean <= 0.013 levels; after
    # normalisation max 0.16. 12 levels and mean 0.05 are the bounds.
    biggest, mean = raw_diff(path, slice_mode=slice_mode)
    assert biggest <= 12 and mean <= 0.05
    pil = ip.OmniLMMImageProcessor(slice_mode=slice_mode)(path)["pixel_values"][0]
    fast = ip.OmniLMMImageProcessorFast(slice_mode=slice_mode)(path)["pixel_values"][0]
    assert max(max_diff(a, b) for a, b in zip(pil, fast)) <= 0.2


def test_fast_batch_structure_options_and_saving(tmp_path):
    fast = ip.OmniLMMImageProcessorFast(slice_mode=True)
    assert fast.backend == "torchvision" and ip.OmniLMMImageProcessor().backend == "pil"
    out = fast([[BIG, GRAY], [], [RGBA]])
    pil = ip.OmniLMMImageProcessor(slice_mode=True)([[BIG, GRAY], [], [RGBA]])
    assert out["slice_grids"] == pil["slice_grids"] and out["image_sizes"] == pil["image_sizes"]
    assert [[t.shape for t in s] for s in out["pixel_values"]] == [[t.shape for t in s] for s in pil["pixel_values"]]
    assert all(t.is_contiguous() for s in out["pixel_values"] for t in s)
    assert isinstance(fast(GRAY, return_tensors="np")["pixel_values"][0][0], np.ndarray)
    on_cpu = fast(PHOTO, device="cpu")["pixel_values"][0]
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, fast(PHOTO)["pixel_values"][0]))
    bad_inputs = [(None, TypeError), (Image.new("RGB", (0, 10)), ValueError), (np.full((8, 8, 3), 2.0), ValueError)]
    for bad, error in bad_inputs:
        with pytest.raises(error):
            fast(bad)
    ip.OmniLMMImageProcessorFast(**SETTINGS).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == (
        "OmniLMMImageProcessorFast"
    )
    loaded = ip.OmniLMMImageProcessorFast.from_pretrained(tmp_path)
    assert all(getattr(loaded, k) == v for k, v in SETTINGS.items())


# ---------------------------------------------------------------------------------------------
# 8. per-call do_rescale / rescale_factor / do_normalize / image_mean / image_std
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ["OmniLMMImageProcessor", "OmniLMMImageProcessorFast"])
@pytest.mark.parametrize("slice_mode", [False, True])
def test_rescale_and_normalize_settings_are_honoured(cls, slice_mode):
    processor = getattr(ip, cls)(slice_mode=slice_mode)
    raw = processor(PHOTO, **RAW)["pixel_values"][0]
    assert all(torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 255 and t.max() > 1 for t in raw)
    if cls == "OmniLMMImageProcessor" and not slice_mode:  # the original's resize, as 0..255 values
        expected = torch.from_numpy(np.array(Image.open(IMAGES / "photo_640x480.resized.png").convert("RGB")))
        assert torch.equal(raw[0], expected.permute(2, 0, 1).float())

    def check(settings, expected_from_raw):
        out = processor(PHOTO, **settings)["pixel_values"][0]
        assert len(out) == len(raw)
        for got, r in zip(out, raw):
            torch.testing.assert_close(got, expected_from_raw(r), atol=1e-6, rtol=0)

    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    check({}, lambda r: (r / 255 - mean) / std)  # the defaults
    check(dict(do_rescale=False), lambda r: (r - mean) / std)  # raw 0..255 values normalised
    check(dict(do_normalize=False), lambda r: r / 255)
    check(dict(rescale_factor=1 / 127.5, image_mean=[1, 1, 1], image_std=(0.5, 0.25, 2)),
          lambda r: (r / 127.5 - 1) / torch.tensor([0.5, 0.25, 2]).view(3, 1, 1))
    # set at init (and so saved) rather than per call: the same
    init = getattr(ip, cls)(slice_mode=slice_mode, do_rescale=False, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    assert all(torch.equal(a, b) for a, b in zip(init(PHOTO)["pixel_values"][0], raw))
    with pytest.raises(ValueError, match="rescale_factor"):
        processor(PHOTO, rescale_factor=0)


def test_rescale_settings_round_trip(tmp_path):
    processor = ip.OmniLMMImageProcessor(do_rescale=False, rescale_factor=0.5, do_normalize=False)
    processor.save_pretrained(tmp_path)
    loaded = ip.OmniLMMImageProcessor.from_pretrained(tmp_path)
    assert (loaded.do_rescale, loaded.rescale_factor, loaded.do_normalize) == (False, 0.5, False)
    defaults = ip.OmniLMMImageProcessor()
    assert (defaults.do_rescale, defaults.rescale_factor, defaults.do_normalize) == (True, 1 / 255, True)


# ---------------------------------------------------------------------------------------------
# 9. EXIF orientation
# ---------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_like_image_viewers(tmp_path):
    from transformers.image_utils import load_image as transformers_load_image

    path = tmp_path / "rotated.jpg"
    stored = Image.fromarray(np.asarray(Image.open(PHOTO).convert("RGB"))[:200, :300])  # 300x200 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    stored.save(path, exif=exif, quality=95)
    assert Image.open(path).size == (300, 200) and Image.open(path).getexif()[0x0112] == 6
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert upright.shape == (300, 200, 3)  # 200 wide, 300 high
    assert np.array_equal(np.asarray(ip.load_image(path)), upright)
    assert np.array_equal(np.asarray(ip.load_image(Image.open(path))), upright)
    for cls in (ip.OmniLMMImageProcessor, ip.OmniLMMImageProcessorFast):
        processor = cls(slice_mode=True)
        outs = [processor(x) for x in (path, str(path), Image.open(path), transformers_load_image(str(path)))]
        for out in outs:
            assert out["image_sizes"] == [[(200, 300)]]  # the viewer's size, not the stored one
            assert all(torch.equal(a, b) for a, b in zip(out["pixel_values"][0], outs[0]["pixel_values"][0]))
        source = outs[0]["pixel_values"][0][0]
        assert source.shape[1] > source.shape[2]  # taller than wide, as shown
