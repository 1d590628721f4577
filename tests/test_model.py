"""The model against the original release: conversion, parity with the reference fixtures, batching, errors."""

import contextlib
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

from conftest import FIXTURES, TINY
from omnilmm_tools.convert import convert
from omnilmm_tools.remote import remote_module

CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
IMAGES = ("photo_640x480", "tall_300x800_rgba", "small_120x90_gray")
CASES = json.loads((TINY / "cases.json").read_text())
PATCH, START, END = (CASES["tokens"][t] for t in ("<im_patch>", "<im_start>", "<im_end>"))
NUM_QUERY = CASES["num_query"]


def fixture_pixels(name: str) -> torch.Tensor:
    """The original eval transform, read off the fixture's own resized PNG: `(3, 448, 448)`."""
    array = np.array(Image.open(TINY / "images" / f"{name}.resized.png").convert("RGB"))
    return (torch.from_numpy(array).permute(2, 0, 1).float() / 255 - CLIP_MEAN) / CLIP_STD


@pytest.fixture(scope="session")
def expected():
    return load_file(str(TINY / "expected.safetensors"))


@pytest.fixture(scope="session")
def hub_folder(tmp_path_factory):
    return convert(TINY / "original", tmp_path_factory.mktemp("converted") / "omnilmm-tiny")


@pytest.fixture(scope="session")
def model(hub_folder):
    return AutoModelForCausalLM.from_pretrained(hub_folder, trust_remote_code=True, dtype=torch.float32).eval()


def image_span():
    return [START] + [PATCH] * NUM_QUERY + [END]


def prompt(*parts) -> list[int]:
    """Token ids: ints are text tokens, the string "img" is one image span."""
    ids = [1]
    for part in parts:
        ids += image_span() if part == "img" else list(part)
    return ids


@pytest.mark.parametrize("auto_class", [AutoModelForCausalLM, AutoModelForImageTextToText])
def test_converted_folder_reproduces_the_original(hub_folder, expected, auto_class):
    model = auto_class.from_pretrained(hub_folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "OmniLMMForCausalLM"
    with torch.no_grad():
        for name in IMAGES:
            pixels = fixture_pixels(name)[None]
            tower = model.model.vision_tower
            eva = tower.forward_features(pixels)[0, tower.num_prefix_tokens :]
            torch.testing.assert_close(eva, expected[f"vision_tower.{name}"], atol=1e-5, rtol=0)
            torch.testing.assert_close(model.get_vision_embedding(pixels)[0], expected[f"vision.{name}"], atol=1e-5, rtol=0)

        input_ids = expected["case_image.input_ids"].long()
        labels = expected["case_image.labels"].long()
        out = model(input_ids=input_ids, pixel_values=fixture_pixels("photo_640x480")[None], labels=labels)
        torch.testing.assert_close(out.logits[0], expected["case_image.logits"], atol=1e-3, rtol=0)
        torch.testing.assert_close(out.loss.reshape(1), expected["case_image.loss"], atol=1e-5, rtol=0)

        text = model(input_ids=expected["case_text.input_ids"].long())
        torch.testing.assert_close(text.logits[0], expected["case_text.logits"], atol=1e-3, rtol=0)


def test_auto_model_is_the_base_model_and_gives_the_decoder_states(hub_folder, model, expected):
    base = AutoModel.from_pretrained(hub_folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(base).__name__ == "OmniLMMModel"
    input_ids = expected["case_image.input_ids"].long()
    pixels = fixture_pixels("photo_640x480")[None]
    with torch.no_grad():
        states = base(input_ids=input_ids, pixel_values=pixels).last_hidden_state
        full = model(input_ids=input_ids, pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(model.lm_head(states)[0], expected["case_image.logits"], atol=1e-3, rtol=0)
    torch.testing.assert_close(states, full.hidden_states[-1], atol=0, rtol=0)


def test_greedy_generation_matches_the_original(model, expected):
    input_ids = expected["case_image.input_ids"].long()
    generated = model.generate(
        input_ids, pixel_values=fixture_pixels("photo_640x480")[None], do_sample=False, max_new_tokens=12
    )
    assert torch.equal(generated[0, : input_ids.shape[1]], input_ids[0])
    assert generated[0, input_ids.shape[1] :].tolist() == expected["case_generate.new_tokens"].long().tolist()


def test_real_12b_layout_on_the_meta_device():
    config_cls = remote_module("configuration_omnilmm").OmniLMMConfig
    model_cls = remote_module("modeling_omnilmm").OmniLMMForCausalLM
    config = config_cls(**json.loads((FIXTURES / "omnilmm-12b" / "config.json").read_text()))
    layout = json.loads((FIXTURES / "omnilmm-12b" / "keys.json").read_text())
    started = time.perf_counter()
    with torch.device("meta"):
        model = model_cls(config)
    seconds = time.perf_counter() - started
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == layout["keys"]
    assert sum(t.numel() for t in model.state_dict().values()) == layout["num_parameters"]
    assert seconds < 60, f"building the 12B layout on meta took {seconds:.1f} s: something initialised real tensors"


def test_loaded_buffers_hold_their_true_values(model, hub_folder):
    k_biases = [m.k_bias for m in model.model.vision_tower.modules() if getattr(m, "k_bias", None) is not None]
    assert k_biases, "the EVA attention blocks lost their k_bias buffer"
    assert all(torch.equal(b, torch.zeros_like(b)) for b in k_biases)

    stored = load_file(str(hub_folder / "model.safetensors"))["model.resampler.pos_embed"]
    original = torch.load(TINY / "original" / "pytorch_model.bin", weights_only=True)["model.resampler.pos_embed"]
    assert torch.equal(stored, original)
    assert torch.equal(model.model.resampler.pos_embed, original.float())


def test_several_images_in_one_sample_match_each_image_alone(model):
    pixels = torch.stack([fixture_pixels(name) for name in IMAGES[:2]])
    ids = torch.tensor([prompt([5, 6], "img", [7], "img", [8, 9])])
    with torch.no_grad():
        alone = torch.cat([model.get_vision_embedding(p[None]) for p in pixels])
        together = model(input_ids=ids, pixel_values=pixels).logits
        precomputed = model(input_ids=ids, vision_hidden_states=alone).logits
        nested = model(input_ids=ids, pixel_values=[[pixels[0], pixels[1]]]).logits
        swapped = model(input_ids=ids, vision_hidden_states=alone.flip(0)).logits
    torch.testing.assert_close(together, precomputed, atol=1e-4, rtol=0)
    torch.testing.assert_close(nested, precomputed, atol=1e-4, rtol=0)
    # the second image really is used (the original kept only the last image of a sample)
    assert (swapped - together).abs().max() > 1e-2


def test_image_and_text_only_samples_batch_with_left_padding(model):
    pixels = fixture_pixels("photo_640x480")
    image_ids = prompt([11, 12], "img", [13, 14, 15])
    text_ids = prompt([21, 22, 23, 24])
    pad = len(image_ids) - len(text_ids)
    batch = torch.tensor([image_ids, [0] * pad + text_ids])
    mask = torch.tensor([[1] * len(image_ids), [0] * pad + [1] * len(text_ids)])
    generate = dict(do_sample=False, max_new_tokens=6)
    with torch.no_grad():
        batched = model(input_ids=batch, attention_mask=mask, pixel_values=[[pixels], []]).logits
        image_alone = model(input_ids=torch.tensor([image_ids]), pixel_values=pixels[None]).logits
        text_alone = model(input_ids=torch.tensor([text_ids])).logits
        tokens = model.generate(batch, attention_mask=mask, pixel_values=[[pixels], []], **generate)
        image_tokens = model.generate(torch.tensor([image_ids]), pixel_values=pixels[None], **generate)
        text_tokens = model.generate(torch.tensor([text_ids]), **generate)
    torch.testing.assert_close(batched[0], image_alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched[1, pad:], text_alone[0], atol=1e-4, rtol=0)
    assert tokens[0, len(image_ids) :].tolist() == image_tokens[0, len(image_ids) :].tolist()
    assert tokens[1, len(image_ids) :].tolist() == text_tokens[0, len(text_ids) :].tolist()


def test_precomputed_vision_hidden_states_generate_the_same(model):
    pixels = fixture_pixels("tall_300x800_rgba")[None]
    ids = torch.tensor([prompt([3, 4], "img", [5])])
    with torch.no_grad():
        features = model.get_vision_embedding(pixels)
        from_pixels = model.generate(ids, pixel_values=pixels, do_sample=False, max_new_tokens=5)
        from_features = model.generate(ids, vision_hidden_states=features, do_sample=False, max_new_tokens=5)
    assert from_pixels.tolist() == from_features.tolist()


def test_beam_search_repeats_each_samples_images(model):
    pixels = [fixture_pixels(name) for name in IMAGES]
    first, second = prompt([5], "img", [6], "img", [7]), prompt([8], "img", [9] * (NUM_QUERY + 4))
    beams = dict(do_sample=False, num_beams=2, num_return_sequences=2, max_new_tokens=3)
    with torch.no_grad():
        batched = model.generate(torch.tensor([first, second]), pixel_values=torch.stack(pixels), **beams)
        first_alone = model.generate(torch.tensor([first]), pixel_values=torch.stack(pixels[:2]), **beams)
        second_alone = model.generate(torch.tensor([second]), pixel_values=pixels[2][None], **beams)
    assert batched.tolist() == first_alone.tolist() + second_alone.tolist()


@contextlib.contextmanager
def count_vision_forwards(model):
    """Record the input shape of every vision-tower forward inside the block."""
    tower, calls = model.model.vision_tower, []
    original = tower.forward_features

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    tower.forward_features = counting
    try:
        yield calls
    finally:
        del tower.forward_features


def test_images_are_encoded_in_one_forward_per_shape_group(model):
    small = [torch.randn(3, 224, 280) for _ in range(3)]
    square = [torch.randn(3, 448, 448) for _ in range(4)]
    images = [square[0], small[0], square[1], small[1], square[2], small[2], square[3]]
    with count_vision_forwards(model) as calls, torch.no_grad():
        together = model.get_vision_embedding([images])
    assert sorted(calls) == sorted([(3, 3, 224, 280), (4, 3, 448, 448)])
    with torch.no_grad():
        for image, feature in zip(images, together):
            torch.testing.assert_close(feature, model.get_vision_embedding(image[None])[0], atol=1e-5, rtol=0)

    model.config.vision_batch_size = 2
    try:
        with count_vision_forwards(model) as calls, torch.no_grad():
            model.get_vision_embedding(torch.stack(square))
    finally:
        model.config.vision_batch_size = 16
    assert calls == [(2, 3, 448, 448), (2, 3, 448, 448)]


@pytest.mark.parametrize(
    "ids, images, message",
    [
        (prompt([5], "img", [6], "img"), 1, "2 image spans but 1 image"),
        (prompt([5], "img"), 2, "1 image spans but 2 image"),
        (prompt([5], [START] + [PATCH] * (NUM_QUERY - 1) + [END]), 1, f"need {NUM_QUERY} <im_patch>"),
        (prompt([5], [START] + [PATCH] * NUM_QUERY + [6]), 1, "1 <im_start> but 0 <im_end>"),
        (prompt([5], [PATCH] * NUM_QUERY + [END, START]), 1, "span that is cut or interleaved"),
        (prompt([5], "img"), 0, "1 image spans but no pixel_values"),
    ],
)
def test_malformed_image_spans_are_value_errors(model, ids, images, message):
    pixels = torch.zeros(images, 3, 448, 448) if images else None
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.tensor([ids]), pixel_values=pixels)


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.zeros(3, 448, 448), "num_images, 3, height, width"),
        (torch.zeros(1, 4, 448, 448), "num_images, 3, height, width"),
        ([[torch.zeros(1, 448, 448)]], r"\(3, height, width\)"),
    ],
)
def test_malformed_pixel_values_are_value_errors(model, pixels, message):
    with pytest.raises(ValueError, match=message):
        model(input_ids=torch.tensor([prompt([5], "img")]), pixel_values=pixels)


def test_save_and_reload_is_bit_exact_and_bf16_loads(model, tmp_path, expected):
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.float32)
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    assert all(torch.equal(original_state[k], reloaded_state[k]) for k in original_state)

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        logits = bf16(
            input_ids=expected["case_image.input_ids"].long(), pixel_values=fixture_pixels("photo_640x480")[None]
        ).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits[0].float() - expected["case_image.logits"]).abs().max() < 1.0
