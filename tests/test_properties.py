"""Property tests (hypothesis, bounded) on the slicing geometry, the image processor and the processor.

- `slice_layout`: any size from 1 px to 20,000 px a side (extreme aspect ratios included), 1..12 slices, never_split:
  every size is a positive multiple of patch_size, the grid has at most max_slice_nums tiles, and it is sliced
  exactly when the original algorithm slices.
- the image processor: every PIL mode, small images, square and slice mode: finite float32 `(3, H, W)` tensors
  whose sizes and order (source, then tiles row by row) are those of `slice_layout`.
- the processor: random prompts with random placeholder counts: one `<im_start> <im_patch>*num_query <im_end>`
  span per image tensor, in order; a placeholder/image mismatch is an error; truncation never cuts a span; a batch
  gives the same ids (modulo left padding) and tensors as one prompt at a time.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from omnilmm_tools.remote import remote_module

ip = remote_module("image_processing_omnilmm")
NUM_QUERY = 4
PATCH, START, END = 32000, 32001, 32002
SCALE, PATCH_SIZE = 28, 14  # tiny tiles, so that images of a few dozen pixels are sliced: fast
BOUNDED = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

SIDE = st.one_of(
    st.integers(1, 20_000),
    st.integers(1, 600),
    st.sampled_from([1, 2, 13, 14, 15, 447, 448, 449, 895, 896, 1344, 19_999, 20_000]),
)
SMALL_SIDE = st.integers(1, 90)
PIL_MODES = [
    "1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA", "RGBa", "RGBX",
    "I;16", "I;16B", "I;16L",
]


# ---------------------------------------------------------------------------------------------------------------------
# slice_layout
# ---------------------------------------------------------------------------------------------------------------------


def positive_multiples(size, patch_size):
    return all(isinstance(v, int) and v > 0 and v % patch_size == 0 for v in size)


@settings(max_examples=1000, **BOUNDED)
@given(
    width=SIDE,
    height=SIDE,
    max_slice_nums=st.integers(1, 12),
    never_split=st.booleans(),
    scale_resolution=st.sampled_from([224, 336, 448]),
    patch_size=st.sampled_from([14, 16]),
)
def test_slice_layout_invariants(width, height, max_slice_nums, never_split, scale_resolution, patch_size):
    source, grid, tile = ip.slice_layout((width, height), max_slice_nums, scale_resolution, patch_size, never_split)
    assert positive_multiples(source, patch_size)
    multiple = min(math.ceil(width * height / scale_resolution**2), max_slice_nums)
    assert (grid is None) == (never_split or multiple <= 1)  # sliced exactly when the original slices
    if grid is None:
        assert tile is None
        return
    cols, rows = grid
    assert cols >= 1 and rows >= 1
    assert 2 <= cols * rows <= max_slice_nums
    assert cols * rows in (multiple - 1, multiple, multiple + 1)
    assert positive_multiples(tile, patch_size)
    # the processor's own helper agrees
    processor = ip.OmniLMMImageProcessor(slice_mode=True, scale_resolution=scale_resolution, patch_size=patch_size)
    assert processor.slice_grid((width, height), max_slice_nums=max_slice_nums, never_split=never_split) == grid


# ---------------------------------------------------------------------------------------------------------------------
# The image processor: every PIL mode
# ---------------------------------------------------------------------------------------------------------------------


def make_image(mode, width, height, seed, wide_range):
    """A random image of `mode`; with `wide_range`, I / F / I;16 values go beyond 0..255 (or 0..1)."""
    rng = np.random.default_rng(seed)
    if wide_range and mode == "I":
        return Image.fromarray(rng.integers(-1000, 70_000, (height, width), dtype=np.int32))
    if wide_range and mode == "F":
        return Image.fromarray(rng.uniform(-2.0, 3.0, (height, width)).astype(np.float32))
    if wide_range and mode == "I;16":
        return Image.fromarray(rng.integers(0, 65_536, (height, width), dtype=np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return rgb.convert(mode)


@settings(max_examples=200, **BOUNDED)
@given(
    mode=st.sampled_from(PIL_MODES),
    width=SMALL_SIDE,
    height=SMALL_SIDE,
    seed=st.integers(0, 2**16),
    wide_range=st.booleans(),
    slice_mode=st.booleans(),
    max_slice_nums=st.integers(1, 12),
    never_split=st.booleans(),
)
@example(mode="La", width=1, height=1, seed=0, wide_range=False, slice_mode=False, max_slice_nums=1, never_split=False)
@example(mode="I", width=90, height=3, seed=1, wide_range=True, slice_mode=True, max_slice_nums=12, never_split=False)
def test_image_processor_handles_every_mode_and_size(
    mode, width, height, seed, wide_range, slice_mode, max_slice_nums, never_split
):
    image = make_image(mode, width, height, seed, wide_range)
    processor = ip.OmniLMMImageProcessor(
        image_size=28, slice_mode=slice_mode, scale_resolution=SCALE, patch_size=PATCH_SIZE
    )
    out = processor(image, max_slice_nums=max_slice_nums, never_split=never_split)
    tensors, grid = out["pixel_values"][0], out["slice_grids"][0][0]
    assert out["image_sizes"] == [[(width, height)]]
    if slice_mode:
        source, expected_grid, tile = ip.slice_layout((width, height), max_slice_nums, SCALE, PATCH_SIZE, never_split)
        assert grid == expected_grid
        sizes = [source] + ([tile] * (grid[0] * grid[1]) if grid else [])
    else:
        assert grid is None
        sizes = [(28, 28)]
    assert [(t.shape[2], t.shape[1]) for t in tensors] == sizes  # source first, then the tiles
    mean = torch.tensor(ip.OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(ip.OPENAI_CLIP_STD).view(3, 1, 1)
    for tensor in tensors:
        assert tensor.dtype == torch.float32 and tensor.shape[0] == 3 and torch.isfinite(tensor).all()
        assert ((tensor >= (0 - mean) / std - 1e-5) & (tensor <= (1 - mean) / std + 1e-5)).all()


@pytest.mark.parametrize("wide_range", [False, True])
@pytest.mark.parametrize("mode", PIL_MODES)
def test_every_pil_mode_is_read(mode, wide_range):
    """Every mode at least once per run (hypothesis draws them at random)."""
    test_image_processor_handles_every_mode_and_size.hypothesis.inner_test(
        mode, 45, 31, seed=3, wide_range=wide_range, slice_mode=True, max_slice_nums=4, never_split=False
    )


# ---------------------------------------------------------------------------------------------------------------------
# The processor: random prompts, placeholder counts, truncation, batches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def processor(tokenizer):
    image_processor = ip.OmniLMMImageProcessor(image_size=28, scale_resolution=SCALE, patch_size=PATCH_SIZE)
    return remote_module("processing_omnilmm").OmniLMMProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_query=NUM_QUERY
    )


# Text without "<" or ">": it can hold no placeholder and no special token by accident.
TEXT = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), max_size=24)
SIZES = st.tuples(SMALL_SIDE, SMALL_SIDE)


@st.composite
def prompts(draw, max_images=3):
    """(prompt text, images): random text around a random number of `<image>` placeholders, one image each."""
    chunks = draw(st.lists(TEXT, min_size=1, max_size=max_images + 1))
    sizes = draw(st.lists(SIZES, min_size=len(chunks) - 1, max_size=len(chunks) - 1))
    colors = draw(st.lists(st.integers(0, 255), min_size=len(sizes), max_size=len(sizes)))
    images = [Image.new("RGB", size, (color, 255 - color, 7)) for size, color in zip(sizes, colors)]
    return "<image>".join(chunks), images


def spans_of(ids):
    """The image spans of one id list, checked to be whole: [(start, end)] positions of <im_start> and <im_end>."""
    spans, position = [], 0
    while START in ids[position:]:
        start = ids.index(START, position)
        assert ids[start + 1 : start + 1 + NUM_QUERY] == [PATCH] * NUM_QUERY
        assert ids[start + 1 + NUM_QUERY] == END
        spans.append((start, start + 1 + NUM_QUERY))
        position = start + 2 + NUM_QUERY
    assert ids.count(PATCH) == NUM_QUERY * len(spans) and ids.count(END) == len(spans)
    return spans


def flat_pixels(image, shape):
    """The normalised tensor of a flat-colour image at `shape`."""
    mean = torch.tensor(ip.OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(ip.OPENAI_CLIP_STD).view(3, 1, 1)
    colour = torch.tensor(image.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1)
    return ((colour / 255 - mean) / std).expand(shape)


def expected_sizes(images, slice_mode, max_slice_nums):
    """Per image, the (w, h) of its tensors in span order: source, then tiles row by row."""
    sizes = []
    for image in images:
        if not slice_mode:
            sizes.append([(28, 28)])
            continue
        source, grid, tile = ip.slice_layout(image.size, max_slice_nums, SCALE, PATCH_SIZE)
        sizes.append([source] + ([tile] * (grid[0] * grid[1]) if grid else []))
    return sizes


@settings(max_examples=150, **BOUNDED)
@given(prompt=prompts(), extra_images=st.integers(-1, 1), slice_mode=st.booleans(), max_slice_nums=st.integers(1, 12))
def test_processor_spans_match_pixel_values(processor, prompt, extra_images, slice_mode, max_slice_nums):
    text, images = prompt
    placeholders = len(images)
    if extra_images > 0:
        images = images + [Image.new("RGB", (5, 5))]
    elif extra_images < 0 and images:
        images = images[:-1]
    if len(images) != placeholders:
        with pytest.raises(ValueError, match="tokens in the prompts should be the same as the number of images"):
            processor(text=text, images=images, slice_mode=slice_mode, max_slice_nums=max_slice_nums)
        return
    out = processor(
        text=text, images=images or None, slice_mode=slice_mode, max_slice_nums=max_slice_nums, return_tensors=None
    )
    ids = out["input_ids"][0]
    spans = spans_of(ids)
    sizes = expected_sizes(images, slice_mode, max_slice_nums)
    if not images:
        assert spans == [] and "pixel_values" not in out
        return
    tensors = out["pixel_values"][0]
    assert len(spans) == len(tensors) == sum(len(s) for s in sizes)  # one span per tensor
    assert [(t.shape[2], t.shape[1]) for t in tensors] == [size for s in sizes for size in s]  # in order
    grids = out["slice_grids"][0]
    assert [1 + (g[0] * g[1] if g else 0) for g in grids] == [len(s) for s in sizes]
    # each span's tensor shows its own image (every image is one flat colour): no image lands in another's span
    owners = [image for image, s in zip(images, sizes) for _ in s]
    assert all(torch.equal(tensor, flat_pixels(image, tensor.shape)) for tensor, image in zip(tensors, owners))
    assert ids.count(1) == 1 and ids[0] == 1  # one BOS, in front


@settings(max_examples=150, **BOUNDED)
@given(prompt=prompts(max_images=2), max_length=st.integers(1, 80), slice_mode=st.booleans())
def test_truncation_never_cuts_a_span(processor, prompt, max_length, slice_mode):
    text, images = prompt
    kwargs = dict(images=images or None, slice_mode=slice_mode, max_slice_nums=4, return_tensors=None)
    full = processor(text=text, **kwargs)["input_ids"][0]
    try:
        out = processor(text=text, truncation=True, max_length=max_length, **kwargs)
    except ValueError as error:
        assert "would cut through the image spans" in str(error)
        # refused only when truncating (from the right) really would cut a span
        assert spans_of(full)[-1][1] >= max_length
        return
    ids = out["input_ids"][0]
    assert len(ids) == min(len(full), max_length) and ids == full[: len(ids)]
    assert len(spans_of(ids)) == len(spans_of(full))  # every span intact
    assert len(out["pixel_values"][0] if images else []) == len(spans_of(ids))


@settings(max_examples=60, **BOUNDED)
@given(batch=st.lists(prompts(max_images=2), min_size=2, max_size=3), slice_mode=st.booleans())
def test_a_batch_equals_one_prompt_at_a_time(processor, batch, slice_mode):
    texts = [text for text, _ in batch]
    images = [sample_images for _, sample_images in batch]
    kwargs = dict(slice_mode=slice_mode, max_slice_nums=4)
    together = processor(text=texts, images=images if any(images) else None, **kwargs)
    for row, (text, sample_images) in enumerate(batch):
        alone = processor(text=text, images=sample_images or None, **kwargs)
        mask = together["attention_mask"][row].bool()
        assert not mask[: int((~mask).sum())].any()  # padding is on the left
        assert together["input_ids"][row][mask].tolist() == alone["input_ids"][0].tolist()
        if any(images):
            expected = alone["pixel_values"][0] if sample_images else []
            assert len(together["pixel_values"][row]) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(together["pixel_values"][row], expected))
