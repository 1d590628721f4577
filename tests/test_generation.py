"""Generic Transformers generation tools on OmniLMM (transformers' own contracts, no special cases): tuple outputs,
a caller's cache, assisted decoding, `inputs_embeds`, no cache, a static cache and `torch.compile`."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from conftest import TINY
from omnilmm_tools.convert import convert
from test_model import fixture_pixels, prompt

CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

NEW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = convert(TINY / "original", tmp_path_factory.mktemp("generation") / "omnilmm-tiny")
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def inputs():
    """A text + image prompt of the tiny fixture model (vocabulary 1009, image tokens 1000..1002)."""
    ids = torch.tensor([prompt([5, 6, 7], "img", [8, 9])])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": fixture_pixels("photo_640x480")[None]}


@pytest.fixture(scope="module")
def reference(model, inputs):
    return model.generate(**inputs, do_sample=False, max_new_tokens=NEW)


def greedy(model, max_new_tokens=NEW, **kwargs):
    return model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens)


def test_return_dict_false_gives_tuples(model, inputs):
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        base = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits, atol=0, rtol=0)


def test_a_callers_cache_and_continuing_from_the_returned_cache(model, inputs, reference):
    """Under the installed transformers' name for it (`cache` from 5.24, `past_key_values` before)."""
    name = CACHE_ARG
    cache = DynamicCache(config=model.config)
    out = model.generate(**inputs, **{name: cache}, do_sample=False, max_new_tokens=NEW // 2, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference[:, : inputs["input_ids"].shape[1] + NEW // 2])
    mask = torch.ones_like(out.sequences)
    more = greedy(model, input_ids=out.sequences, attention_mask=mask, max_new_tokens=NEW // 2, **{name: out[name]})
    assert torch.equal(more, reference)


def test_a_cache_under_the_other_name_is_refused_not_ignored(model, inputs):
    other = "past_key_values" if CACHE_ARG == "cache" else "cache"
    with torch.no_grad(), pytest.raises(ValueError, match="two caches were given"):
        model(**inputs, **{CACHE_ARG: DynamicCache(config=model.config), other: DynamicCache(config=model.config)})


def test_assisted_decoding_with_an_image(model, inputs, reference):
    assert torch.equal(greedy(model, **inputs, assistant_model=model), reference)


def test_generate_from_inputs_embeds(model, inputs, reference):
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    out = greedy(model, inputs_embeds=embeds, attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    assert torch.equal(out, reference[:, ids.shape[1] :])  # from embeddings, generate returns the new tokens only
    text_ids = torch.tensor([prompt([5, 6, 7, 8])])
    text_embeds = model.get_input_embeddings()(text_ids).detach()
    assert torch.equal(greedy(model, inputs_embeds=text_embeds), greedy(model, input_ids=text_ids)[:, text_ids.shape[1] :])


def test_forward_from_inputs_embeds_finds_the_image_positions(model, inputs):
    with torch.no_grad():
        from_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        from_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-6, rtol=0)


def test_no_cache_generation_never_breaks_on_image_tokens(model, inputs):
    """Image-span tokens are input only: generation suppresses them (generation_config.json), so that without a
    cache, where every step re-reads the whole sequence and its spans, a generated span cannot break the step."""
    assert model.generation_config.suppress_tokens == [1000, 1001, 1002]
    original = model.lm_head.weight.data.clone()
    try:
        model.lm_head.weight.data[1001] = model.lm_head.weight.data[1001] + 50  # <im_start> wins every step
        plain = greedy(model, **inputs)
        no_cache = greedy(model, **inputs, use_cache=False)
    finally:
        model.lm_head.weight.data.copy_(original)
    assert torch.equal(no_cache, plain)
    assert not torch.isin(plain[:, inputs["input_ids"].shape[1] :], torch.tensor([1000, 1001, 1002])).any()


def test_static_cache_generation(model, inputs, reference):
    assert torch.equal(greedy(model, **inputs, cache_implementation="static"), reference)


def test_compiled_fullgraph_forward_with_an_image(model, inputs, reference):
    """`torch.compile(model.forward, fullgraph=True)`: the image prefill and the static-cache decoding steps each
    compile as one graph, and give the same greedy tokens."""
    assert model._can_compile_fullgraph
    forward = model.forward
    model.forward = torch.compile(forward, fullgraph=True, dynamic=False)
    try:
        out = greedy(model, **inputs, cache_implementation="static")
    finally:
        model.forward = forward
    assert torch.equal(out, reference)
