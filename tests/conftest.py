import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
TINY = FIXTURES / "omnilmm-tiny-original"


@pytest.fixture(scope="session")
def fixtures_dir():
    assert FIXTURES.is_dir(), f"reference fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def tokenizer():
    """The real Mistral v0.1 vocabulary plus OmniLMM's 9 special tokens (built once: it takes seconds)."""
    from omnilmm_tools.tokenizer import build_tokenizer

    return build_tokenizer()


def make_tiny_model_folder(path, tokenizer, slice_mode=False, num_query=16, seed=0, **image_processor_kwargs):
    """A random tiny OmniLMM with the real tokenizer, saved as a Hub folder (model, processor, remote code)."""
    import torch

    from omnilmm_tools.convert import copy_remote_code, generation_config
    from omnilmm_tools.remote import remote_module
    from omnilmm_tools.tokenizer import save_processor

    config = remote_module("configuration_omnilmm").OmniLMMConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_query=num_query,
        vision_tower_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0},
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = remote_module("modeling_omnilmm").OmniLMMForCausalLM(config).eval()
    image_processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(
        slice_mode=slice_mode, **image_processor_kwargs
    )
    processor = remote_module("processing_omnilmm").OmniLMMProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_query=num_query
    )
    model.save_pretrained(path)
    save_processor(processor, path)
    generation_config(config).save_pretrained(path)
    copy_remote_code(path)
    return path
