"""omnilmm-convert on an original-format folder with the real vocabulary size: shards, tokenizer, processor."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from conftest import TINY, make_original_folder, run_converter
from omnilmm_tools.remote import REMOTE_CODE_FILES, remote_module


@pytest.fixture(scope="module")
def original_folder(tmp_path_factory):
    return make_original_folder(tmp_path_factory.mktemp("original") / "OmniLMM-small")


@pytest.fixture(scope="module")
def converted(original_folder, tmp_path_factory):
    return run_converter(original_folder, tmp_path_factory.mktemp("converted") / "hub")


def test_the_hub_folder_is_self_contained(converted):
    names = {path.name for path in converted.iterdir()}
    assert set(REMOTE_CODE_FILES) <= names
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md"} <= names
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= names
    shards = sorted(name for name in names if name.endswith(".safetensors"))
    assert len(shards) > 1
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_omnilmm.OmniLMMForCausalLM"
    assert (config["im_patch_token_id"], config["im_start_token_id"], config["im_end_token_id"]) == (32000, 32001, 32002)
    assert config["use_cache"] is True


def test_weights_survive_conversion_exactly(converted, original_folder):
    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.bfloat16)
    original = torch.load(original_folder / "pytorch_model.bin", weights_only=True)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in original.items())


def test_tokenizer_and_processor_come_from_the_mistral_vocabulary(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert len(tokenizer) == 32009
    assert tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>", "</quad>"]) == [32000, 32001, 32002, 32008]
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    assert type(processor).__name__ == "OmniLMMProcessor" and processor.num_query == 64
    model = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32)
    answer = model.chat(
        image=torch.zeros(3, 60, 80, dtype=torch.uint8), msgs=[{"role": "user", "content": "Hi?"}], sampling=False, max_new_tokens=3
    )
    assert isinstance(answer, str)


def test_a_folder_whose_vocabulary_mistral_cannot_serve_still_converts(tmp_path, capsys):
    from omnilmm_tools.convert import convert

    dst = convert(TINY / "original", tmp_path / "hub")
    assert "no tokenizer files" in capsys.readouterr().out
    names = {path.name for path in dst.iterdir()}
    assert "tokenizer.json" not in names and "model.safetensors" in names
    image_processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
    assert type(image_processor).__name__ == "OmniLMMImageProcessor"


def test_the_shipped_demo_model_carries_the_current_remote_code():
    from omnilmm_tools.remote import ROOT

    for name in REMOTE_CODE_FILES:
        assert (ROOT / "demo_model" / name).read_text() == (ROOT / name).read_text(), f"demo_model/{name} is stale"
