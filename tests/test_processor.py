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
    assert prompt.startswith("<s><|system|>")
    for text in (prompt, prompt[len("<s>") :]):  # the template's BOS, or the one the processor adds: never two
        ids = processor(text=text).input_ids[0].tolist()
        assert ids[0] == 1 and ids.count(1) == 1
    assert processor(text=prompt, add_special_tokens=False).input_ids[0].tolist() == ids


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
    assert ids == tokenizer(rendered.replace("<image>", SPAN), add_special_tokens=False).input_ids
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
    # model_input_names lists every key the processor returns (transformers' processors drop the others)
    assert sorted(processor.model_input_names) == sorted(out.keys())


def test_save_and_auto_processor_round_trip(processor, tmp_path):
    from transformers import AutoProcessor

    from omnilmm_tools.tokenizer import save_processor

    folder = tmp_path / "model"
    save_processor(processor, folder)  # what every tool that writes a model folder uses
    for name in ("image_processing_omnilmm.py", "processing_omnilmm.py"):
        shutil.copy(ROOT / name, folder / name)  # what a converted model folder carries anyway
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {
        p.name for p in folder.iterdir()
    }
    saved_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved_config["add_bos_token"] is True and saved_config["add_eos_token"] is False
    auto_map = json.loads((folder / "processor_config.json").read_text())["auto_map"]
    assert auto_map["AutoProcessor"] == "processing_omnilmm.OmniLMMProcessor"
    loaded = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "OmniLMMProcessor"
    assert type(loaded.image_processor).__name__ == "OmniLMMImageProcessor"
    assert loaded.num_query == NUM_QUERY and loaded.chat_template == processor.chat_template
    assert loaded.tokenizer.padding_side == "left"
    texts, images = ["<image>\nWhat is this?", "Hi"], [image()]
    want, got = processor(text=texts, images=images), loaded(text=texts, images=images)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.attention_mask, want.attention_mask)
    assert torch.equal(got.pixel_values[0][0], want.pixel_values[0][0])
    # A processor loaded with trust_remote_code and saved again with plain save_pretrained still loads as itself.
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    config = json.loads((again / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_omnilmm.OmniLMMProcessor"
    assert config["image_processor"]["auto_map"]["AutoImageProcessor"] == "image_processing_omnilmm.OmniLMMImageProcessor"
    reloaded = AutoProcessor.from_pretrained(again, trust_remote_code=True)
    assert type(reloaded).__name__ == "OmniLMMProcessor" and reloaded.num_query == NUM_QUERY
    assert type(reloaded.image_processor).__name__ == "OmniLMMImageProcessor"
    assert torch.equal(reloaded(text=texts, images=images).input_ids, want.input_ids)


def span_count(ids):
    return sum(t in (IM_PATCH, IM_START, IM_END) for t in ids)


def test_num_multimodal_tokens_match_the_emitted_spans(slice_processor):
    """`_get_num_multimodal_tokens` (sizes only, as vLLM asks: (height, width)) gives, for every case of
    slicing.json, the image-span tokens and views that the processor emits for that image."""
    from conftest import TINY

    cases = json.loads((TINY / "slicing.json").read_text())["cases"]
    assert len(cases) == 320
    groups = {}
    for case in cases:
        groups.setdefault((case["max_slice_nums"], case["never_split"]), []).append(case)
    for (max_slice_nums, never_split), group in groups.items():
        options = {"max_slice_nums": max_slice_nums, "never_split": never_split}
        mm = slice_processor._get_num_multimodal_tokens([c["size"][::-1] for c in group], **options)
        grids = [[tuple(c["grid"]) if c["grid"] else None] for c in group]
        out = slice_processor.expand_and_tokenize(["<image>"] * len(group), grids, padding=False, return_tensors=None)
        assert mm.num_image_tokens == [span_count(ids) for ids in out["input_ids"]]
        assert mm.num_image_patches == [1 + len(c["slice_sizes"]) for c in group]
    # The same through __call__ with pixels, for a few sizes, and with the options nested.
    for w, h in [(1344, 1008), (200, 900), (64, 48), (2000, 300)]:
        for options in ({}, {"max_slice_nums": 2}, {"images_kwargs": {"max_slice_nums": 1}}):
            out = slice_processor(text="<image>", images=image(w, h), **options)
            mm = slice_processor._get_num_multimodal_tokens([(h, w)], **options)
            assert mm.num_image_tokens == [span_count(out.input_ids[0].tolist())]
            assert mm.num_image_patches == [len(out.pixel_values[0])]
    square = slice_processor._get_num_multimodal_tokens([(1008, 1344)], slice_mode=False)
    assert square.num_image_tokens == [NUM_QUERY + 2] and square.num_image_patches == [1]


def test_kwargs_forms(processor, slice_processor, monkeypatch):
    text = "<image>\nWhat is this?"
    default = processor(text=[text, "Hi"], images=image())
    assert isinstance(default.input_ids, torch.Tensor) and default.attention_mask[1, 0] == 0  # pt, padded left
    flat = processor(text=text, images=image(), padding="max_length", max_length=80)
    nested = processor(text=text, images=image(), text_kwargs={"padding": "max_length", "max_length": 80})
    assert flat.input_ids.shape == (1, 80) and torch.equal(flat.input_ids, nested.input_ids)
    assert flat.attention_mask[0, 0] == 0 and torch.equal(flat.attention_mask, nested.attention_mask)
    right = processor(text=[text, "Hi"], images=image(), text_kwargs={"padding_side": "right"})
    assert right.attention_mask[1, -1] == 0 and right.attention_mask[1, 0] == 1
    as_lists = processor(text=text, images=image(), return_tensors=None)
    assert isinstance(as_lists["input_ids"], list) and as_lists["input_ids"][0] == default.input_ids[0].tolist()
    big = image(1344, 1008)
    sliced = slice_processor(text="<image>", images=big)
    assert slice_processor(text="<image>", images=big, max_slice_nums=1).slice_grids == [[None]]
    assert slice_processor(text="<image>", images=big, images_kwargs={"max_slice_nums": 1}).slice_grids == [[None]]
    assert sliced.slice_grids == [[(3, 2)]]
    with pytest.raises(ValueError, match="two times"):
        processor(text=text, images=image(), padding=True, text_kwargs={"padding": "max_length"})
    seen = []
    preprocess = processor.image_processor.preprocess
    monkeypatch.setattr(processor.image_processor, "preprocess", lambda *a, **k: seen.append(k) or preprocess(*a, **k))
    options = {"do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    processor(text=text, images=image(), **options)
    processor(text=text, images=image(), images_kwargs=options)
    assert len(seen) == 2 and all(all(k.get(key) == value for key, value in options.items()) for k in seen)


def test_mm_token_type_ids_and_replacement_offsets(slice_processor):
    text = "Look: <image> and"
    out = slice_processor(text=text, images=image(1344, 1008), return_mm_token_type_ids=True,
                          return_text_replacement_offsets=True)
    ids, types = out.input_ids[0].tolist(), out.mm_token_type_ids[0].tolist()
    assert types == [int(t in (IM_PATCH, IM_START, IM_END)) for t in ids] and sum(types) == 7 * (NUM_QUERY + 2)
    (offset,) = out["text_replacement_offsets"][0]
    replacement = slice_processor.image_placeholder((3, 2))
    assert offset == {"type": "image", "span": (6, 13), "new_span": (6, 6 + len(replacement)), "text": "<image>",
                      "replacement": replacement}
    nested = slice_processor(text=text, images=image(1344, 1008), text_kwargs={"return_mm_token_type_ids": True})
    assert nested.mm_token_type_ids[0].tolist() == types
    assert "mm_token_type_ids" not in slice_processor(text=text, images=image(1344, 1008))


def test_expand_and_tokenize_is_the_text_half_of_call(slice_processor):
    texts = ["<image> then <image>", "Just <image>", "text"]
    images = [[image(120, 90), image(1344, 1008)], [image(900, 200)], []]
    full = slice_processor(text=texts, images=images)
    half = slice_processor.expand_and_tokenize(texts, full.slice_grids)
    assert set(half) == {"input_ids", "attention_mask"}
    assert torch.equal(half.input_ids, full.input_ids) and torch.equal(half.attention_mask, full.attention_mask)
    assert slice_processor.expand_and_tokenize("<image>", [[None]]).input_ids[0].tolist().count(IM_START) == 1
    with pytest.raises(ValueError, match="would cut through the image spans"):
        slice_processor.expand_and_tokenize("hi <image>", [[(3, 2)]], truncation=True, max_length=30)
    with pytest.raises(ValueError, match=r"one entry per <image>/<video> placeholder: the prompts have \[1\]"):
        slice_processor.expand_and_tokenize("<image>", [[]])
    with pytest.raises(ValueError, match="literal image tokens"):
        slice_processor.expand_and_tokenize("<im_start>", None)


def test_apply_chat_template_returns_tensors_with_images(processor):
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image()}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red box."},
    ]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert isinstance(out["input_ids"], torch.Tensor) and out["input_ids"].shape[0] == 1
    assert isinstance(out["attention_mask"], torch.Tensor)
    assert out["pixel_values"][0][0].shape == (3, 448, 448) and out["image_sizes"] == [[(64, 48)]]
    masked = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    assert torch.equal(masked["input_ids"], out["input_ids"])
    ids, mask = masked["input_ids"][0].tolist(), masked["assistant_masks"][0].tolist()
    assert processor.decode([t for t, m in zip(ids, mask) if m]) == "A red box.</s>"
