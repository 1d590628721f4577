"""omnilmm-convert on an original-format folder with the real vocabulary size: shards, tokenizer, processor."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from conftest import ROOT, TINY, make_original_folder, make_sentencepiece, run_converter
from omnilmm_tools.remote import REMOTE_CODE_FILES


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

    for name in REMOTE_CODE_FILES:  # links to the root's files: one source, never stale
        assert (ROOT / "demo_model" / name).resolve() == (ROOT / name).resolve(), f"demo_model/{name} is a copy"


def test_the_model_cards_are_made_for_their_folders(converted, original_folder):
    for card in ((converted / "README.md").read_text(), (ROOT / "demo_model" / "README.md").read_text()):
        header = card.split("---\n")[1]
        assert card.startswith("---\n") and "pipeline_tag: image-text-to-text" in header and "license: " in header
        assert "trust_remote_code=True" in card and ".chat(" in card
        for project_text in ("venv", "pytest", "omnilmm-bench", "<!-- test-command -->"):
            assert project_text not in card, project_text
    card = (converted / "README.md").read_text()
    assert f"# {original_folder.name} " in card and "omnilmm-convert" in card
    assert "license: other" in card and "states no licence" in card  # the source folder states none


def test_the_card_takes_the_licence_the_source_folder_states(original_folder, tmp_path):
    from omnilmm_tools.model_card import source_licence

    assert source_licence(original_folder)[0] == "other"
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# OmniLMM\n")
    assert source_licence(tmp_path) == ("apache-2.0", "`apache-2.0`, as the source folder's model card states it.")
    (tmp_path / "README.md").unlink()
    (tmp_path / "LICENSE").write_text("\nOmniLMM Model License Agreement\n...")
    assert source_licence(tmp_path)[1] == "The source folder's LICENSE (copied here): \"OmniLMM Model License Agreement\"."


@pytest.fixture(scope="module")
def fixture_with_tokenizer(tmp_path_factory):
    """The fixture (a 1000-token base vocabulary, no tokenizer files) converted with `--tokenizer`."""
    work = tmp_path_factory.mktemp("tokenizer")
    model_file = make_sentencepiece(work / "sp", vocab_size=1000)
    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.convert", str(TINY / "original"), str(work / "hub"),
                             "--tokenizer", str(model_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return work / "hub"


def test_a_folder_without_tokenizer_files_converts_with_tokenizer_and_answers(fixture_with_tokenizer):
    from transformers import pipeline

    hub = fixture_with_tokenizer
    processor = AutoProcessor.from_pretrained(hub, trust_remote_code=True)
    assert len(processor.tokenizer) == 1009 and processor.image_token_ids == [1000, 1001, 1002]
    model = AutoModelForCausalLM.from_pretrained(hub, trust_remote_code=True, dtype=torch.float32)
    image = Image.open(TINY / "images" / "photo_640x480.png")
    answer = model.chat(image=image, msgs=[{"role": "user", "content": "What is this?"}], sampling=False,
                        max_new_tokens=6, min_new_tokens=6)
    pipe = pipeline("image-text-to-text", model=str(hub), trust_remote_code=True, dtype=torch.float32)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    out = pipe(text=messages, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)
    assert answer and out[0]["generated_text"].strip() == answer


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path):
    from omnilmm_tools.convert import convert

    with pytest.raises(ValueError, match=r"The added tokens do not match the OmniLMM tokenizer \(a 1500-token base"):
        convert(TINY / "original", tmp_path / "hub", tokenizer=make_sentencepiece(tmp_path / "sp", vocab_size=1500))
    assert not (tmp_path / "hub").exists()
