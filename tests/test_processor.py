"""OmniLMMProcessor: <image> expansion (square and slice mode), image distribution over a batch, left padding,
span-safe truncation, chat templates, decoding, and the save_pretrained -> AutoProcessor round trip."""

import json
import shutil

import pytest
import torch
from PIL import Image

from omnilmm_tools.remote import ROOT, remote_module

NUM_QUERY = 64
IM_PATCH, IM_START, IM_END = 32000, 32001, 32002
SPAN = "<im_start>" + "<im_patch>" * NUM_QUERY + "<im_end>"


@pytest.fixture(scope="module")
def image_processing():
    return remote_module("image_processing_omnilmm")


@pytest.fixture(scope="module")
def processor(tokenizer, image_processing):
    processing = remote_module("processing_omnilmm")
    return processing.OmniLMMProcessor(
        image_processor=image_processing.OmniLMMImageProcessor(), tokenizer=tokenizer, num_query=NUM_QUERY
    )


@pytest.fixture(scope="module")
def slice_processor(tokenizer, image_processing):
    processing = remote_module("processing_omnilmm")
    image_processor = image_processing.OmniLMMImageProcessor(slice_mode=True)
    return processing.OmniLMMProcessor(image_processor=image_processor, tokenizer=tokenizer, num_query=NUM_QUERY)


def image(width=64, height=48, color=(200, 30, 30)):
    return Image.new("RGB", (width, height), color)


def ids_of(tokenizer, text):
    return tokenizer(text).input_ids


def test_square_mode_expansion(processor, tokenizer):
    out = processor(text="<image>\nWhat is this?", images=image())
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "slice_grids"}
    ids = out.input_ids[0].tolist()
    assert ids == ids_of(tokenizer, SPAN + "\nWhat is this?")
    start = ids.index(IM_START)
    assert ids[start : start + NUM_QUERY + 2] == [IM_START] + [IM_PATCH] * NUM_QUERY + [IM_END]
    assert ids.count(IM_PATCH) == NUM_QUERY and ids.count(1) == 1
    assert out.attention_mask.tolist() == [[1] * len(ids)]
    assert len(out.pixel_values) == 1 and len(out.pixel_values[0]) == 1
    assert out.pixel_values[0][0].shape == (3, 448, 448)
    assert out.image_sizes == [[(64, 48)]] and out.slice_grids == [[None]]
    assert processor.image_placeholder() == SPAN


def test_slice_mode_expansion(slice_processor, tokenizer, image_processing):
    out = slice_processor(text="<image>\nDescribe the photo.", images=image(1344, 1008))
    assert out.slice_grids == [[(3, 2)]]
    ids = out.input_ids[0].tolist()
    # The source span, then per row of tiles "\n" + the row's spans.
    expected_text = SPAN + "\n" + SPAN * 3 + "\n" + SPAN * 3 + "\nDescribe the photo."
    assert ids == ids_of(tokenizer, expected_text)
    assert slice_processor.image_placeholder((3, 2)) == SPAN + "\n" + SPAN * 3 + "\n" + SPAN * 3
    assert ids.count(IM_START) == ids.count(IM_END) == 7 and ids.count(IM_PATCH) == 7 * NUM_QUERY
    # The text between the spans is the row separator only.
    ends = [i for i, t in enumerate(ids) if t == IM_END]
    starts = [i for i, t in enumerate(ids) if t == IM_START]
    gaps = [tokenizer.decode(ids[e + 1 : s]) for e, s in zip(ends, starts[1:])]
    assert [g.strip(" ") for g in gaps] == ["\n", "", "", "\n", "", ""]
    source, grid, tile = image_processing.slice_layout((1344, 1008))
    shapes = [tuple(t.shape) for t in out.pixel_values[0]]
    assert shapes == [(3, source[1], source[0])] + [(3, tile[1], tile[0])] * 6
    # max_slice_nums=1 never slices.
    single = slice_processor(text="<image>", images=image(1344, 1008), max_slice_nums=1)
    assert single.slice_grids == [[None]] and single.input_ids[0].tolist().count(IM_START) == 1


def test_placeholder_image_count_mismatch(processor):
    with pytest.raises(ValueError, match=r"2 <image> placeholder.*1 images"):
        processor(text="<image> and <image>", images=image())
    with pytest.raises(ValueError, match=r"0 <image> placeholder.*1 images"):
        processor(text="no placeholder", images=image())
    with pytest.raises(ValueError, match=r"1 <image> placeholder.*no images"):
        processor(text="<image> alone")
    with pytest.raises(ValueError, match="Prompt 1 has 1 <image>"):
        processor(text=["<image>", "<image>"], images=[[image()], []])
    with pytest.raises(ValueError, match="literal image tokens"):
        processor(text="<im_start><im_patch><im_end>")


def test_bad_text_type(processor):
    with pytest.raises(TypeError):
        processor(text=123)
    with pytest.raises(TypeError):
        processor(text=["ok", 5])
    with pytest.raises(ValueError):
        processor()


def test_flat_image_list_distributed_over_batch(processor):
    images = [image(64, 48, (255, 0, 0)), image(30, 90, (0, 255, 0)), image(50, 50, (0, 0, 255))]
    out = processor(text=["<image> and <image>: which?", "<image> what?"], images=images)
    assert [len(p) for p in out.pixel_values] == [2, 1]
    assert out.image_sizes == [[(64, 48), (30, 90)], [(50, 50)]]
    reference = processor.image_processor(images)["pixel_values"]  # one image per sample
    assert torch.equal(out.pixel_values[0][0], reference[0][0])
    assert torch.equal(out.pixel_values[0][1], reference[1][0])
    assert torch.equal(out.pixel_values[1][0], reference[2][0])
    assert [row.tolist().count(IM_START) for row in out.input_ids] == [2, 1]
    # The same given per sample.
    nested = processor(text=["<image> and <image>: which?", "<image> what?"], images=[images[:2], images[2:]])
    assert torch.equal(nested.input_ids, out.input_ids)
    assert all(torch.equal(a, b) for pa, pb in zip(nested.pixel_values, out.pixel_values) for a, b in zip(pa, pb))


def test_pixel_values_order_per_sample(slice_processor):
    small, big = image(120, 90, (10, 200, 10)), image(1344, 1008, (200, 10, 10))
    out = slice_processor(text=["<image> then <image>", "just text"], images=[[small, big], []])
    assert out.slice_grids == [[None, (3, 2)], []]
    assert len(out.pixel_values[0]) == 1 + 7 and out.pixel_values[1] == []
    ref_small = slice_processor.image_processor(small)["pixel_values"][0]
    ref_big = slice_processor.image_processor(big)["pixel_values"][0]
    for got, want in zip(out.pixel_values[0], ref_small + ref_big):  # per image: source, then tiles row by row
        assert torch.equal(got, want)
    assert out.input_ids[0].tolist().count(IM_START) == 8 and out.input_ids[1].tolist().count(IM_START) == 0


def test_text_only_batch_left_padding(processor, tokenizer):
    texts = ["Hi", "a literal <unk> inside a longer prompt"]
    out = processor(text=texts)
    assert "pixel_values" not in out
    short, long = (ids_of(tokenizer, t) for t in texts)
    n_pad = len(long) - len(short)
    assert out.input_ids.tolist() == [[0] * n_pad + short, long]
    assert out.attention_mask.tolist() == [[0] * n_pad + [1] * len(short), [1] * len(long)]
    assert 0 in long  # the literal <unk> (id 0) is attended to


def test_left_padding_with_images(processor):
    out = processor(text=["<image>\nWhat is this?", "Hello"], images=[image()])
    lengths = out.attention_mask.sum(1).tolist()
    width = out.input_ids.shape[1]
    assert lengths[0] == width and lengths[1] < width
    n_pad = width - lengths[1]
    assert out.attention_mask[1].tolist() == [0] * n_pad + [1] * lengths[1]
    assert out.input_ids[1, :n_pad].tolist() == [0] * n_pad and out.input_ids[1, n_pad].item() == 1
    assert len(out.pixel_values[0]) == 1 and out.pixel_values[1] == []
    right = processor(text=["<image>\nWhat is this?", "Hello"], images=[image()], padding_side="right")
    assert right.attention_mask[1].tolist() == [1] * lengths[1] + [0] * n_pad


def test_truncation_never_cuts_a_span(processor, tokenizer):
    with pytest.raises(ValueError, match=r"max_length=40.*need 66 tokens"):
        processor(text="<image>\nWhat is this?", images=image(), truncation=True, max_length=40)
    long_text = "word " * 200
    with pytest.raises(ValueError, match="max_length=100"):  # fits, but right truncation would cut the span
        processor(text=long_text + "<image>", images=image(), truncation=True, max_length=100)
    ok = processor(text="<image>" + long_text, images=image(), truncation=True, max_length=100)
    assert ok.input_ids.shape == (1, 100) and ok.input_ids[0].tolist().count(IM_PATCH) == NUM_QUERY
    text_only = processor(text=[long_text, "short"], truncation=True, max_length=50)
    assert text_only.input_ids.shape == (2, 50)
    assert text_only.input_ids[0].tolist() == ids_of(tokenizer, long_text)[:50]
    assert text_only.attention_mask[0].tolist() == [1] * 50
    padded = processor(text="short", padding="max_length", max_length=12)
    assert padded.input_ids.shape == (1, 12) and padded.attention_mask[0].tolist()[0] == 0


def test_one_bos(processor, tokenizer):
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert not prompt.startswith("<s>")
    for text in (prompt, "<s>" + prompt):
        ids = processor(text=text).input_ids[0].tolist()
        assert ids[0] == 1 and ids.count(1) == 1
    assert processor(text=prompt, add_special_tokens=False).input_ids[0].tolist() == ids[1:]


def test_apply_chat_template(processor, tokenizer):
    assert processor.chat_template == tokenizer.chat_template
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What is this?"}]}
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|user|>\n<image>\nWhat is this?</s>\n<|assistant|>\n")
    out = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = out["input_ids"][0].tolist()
    assert ids == ids_of(tokenizer, rendered.replace("<image>", SPAN))
    assert ids.count(1) == 1 and ids[0] == 1
    assert len(out["pixel_values"]) == 1 and out["pixel_values"][0][0].shape == (3, 448, 448)
    # A batch of conversations, one of them text-only.
    batch = processor.apply_chat_template(
        [messages, [{"role": "user", "content": "Hello"}]], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert batch["input_ids"].shape[0] == 2 and [len(p) for p in batch["pixel_values"]] == [1, 0]


def test_chat_images_from_paths_and_assistant_masks(processor, tmp_path):
    path = tmp_path / "red.png"
    image(80, 60).save(path)
    messages = [
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A red box."},
        {"role": "user", "content": [{"type": "image", "url": str(path)}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The same."}]},
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["image_sizes"] == [[(80, 60), (80, 60)]]
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0]
    assert len(mask) == len(ids) and ids.count(IM_START) == 2
    # Only the assistant turns and their closing </s> are marked (what fine-tuning puts labels on).
    assert processor.decode([t for t, m in zip(ids, mask) if m]) == "A red box.</s>The same.</s>"


def test_video_frames(processor, tokenizer):
    frames = [image(color=(i * 40, 0, 0)) for i in range(3)]
    out = processor(text="<video>\nWhat happens?", videos=[frames])
    assert out.input_ids[0].tolist() == ids_of(tokenizer, "\n".join([SPAN] * 3) + "\nWhat happens?")
    assert len(out.pixel_values[0]) == 3


def test_decode(processor):
    out = processor(text=["<image>\nWhat is this?", "Hello there"], images=[image()])
    decoded = processor.post_process_image_text_to_text(out.input_ids)
    assert decoded == ["\nWhat is this?", "Hello there"]
    assert processor.batch_decode(out.input_ids, skip_special_tokens=True) == decoded
    assert processor.decode(out.input_ids[1], skip_special_tokens=True) == "Hello there"
    assert processor.post_process_image_text_to_text(out.input_ids[1]) == "Hello there"
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


def test_save_and_auto_processor_round_trip(processor, tmp_path):
    from transformers import AutoProcessor

    folder = tmp_path / "model"
    processor.save_pretrained(folder)
    for name in ("image_processing_omnilmm.py", "processing_omnilmm.py"):
        shutil.copy(ROOT / name, folder / name)  # what a converted model folder carries anyway
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {
        p.name for p in folder.iterdir()
    }
    saved_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved_config["add_bos_token"] is True and saved_config["add_eos_token"] is False
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "processing_omnilmm.OmniLMMProcessor"
    )
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "OmniLMMProcessor"
    assert type(loaded.image_processor).__name__ == "OmniLMMImageProcessor"
    assert loaded.num_query == NUM_QUERY and loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.padding_side == "left"
    texts, images = ["<image>\nWhat is this?", "Hi"], [image()]
    want, got = processor(text=texts, images=images), loaded(text=texts, images=images)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)
    assert torch.equal(got.pixel_values[0][0], want.pixel_values[0][0])
