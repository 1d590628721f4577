"""A converted model split by accelerate between the CPU and disk offload gives the plain load's results.

With `device_map`, accelerate puts a hook on every module that owns weights and, for offloaded modules, loads
those weights only when that module's own `forward` runs. Code that reads a submodule's weights without calling it
(timm's `forward_features` reading the tower's `pos_embed`, `nn.MultiheadAttention` reading `out_proj.weight`,
EVA's attention reading `qkv.weight`) then sees meta tensors: an error, or silently wrong numbers.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import TINY
from omnilmm_tools.convert import convert

CLIP_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
CLIP_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)

DECODER_ON_CPU = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
DEVICE_MAPS = {
    # the image path (vision tower, resampler) and half of the decoder on disk
    "vision-on-disk": {
        **DECODER_ON_CPU,
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.vision_tower": "disk",
        "model.resampler": "disk",
        "lm_head": "disk",
    },
    # the image path on the CPU, the decoder's first layer and the head on disk; EVA split block by block
    "decoder-on-disk": {
        **DECODER_ON_CPU,
        "model.layers.0": "disk",
        "model.layers.1": "cpu",
        # accelerate cannot nest maps ("model.vision_tower" on cpu with one of its blocks on disk): the tower is
        # spelled out by `complete`, which puts what is not named here (its own tensors, other blocks) on the CPU
        "model.vision_tower.blocks.0": "disk",
        "model.resampler": "cpu",
        "lm_head": "disk",
    },
}


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    return convert(TINY / "original", tmp_path_factory.mktemp("device_map") / "omnilmm-tiny")


@pytest.fixture(scope="module")
def plain(hub_folder):
    return AutoModelForCausalLM.from_pretrained(hub_folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def case():
    expected = load_file(str(TINY / "expected.safetensors"))
    array = np.array(Image.open(TINY / "images" / "photo_640x480.resized.png").convert("RGB"))
    pixels = (torch.from_numpy(array).permute(2, 0, 1).float() / 255 - CLIP_MEAN) / CLIP_STD
    return expected["case_image.input_ids"].long(), pixels[None]


def complete(device_map, model):
    """The explicit map, with every module the test did not name put on the CPU, at the granularity of the named
    keys (a flat map: accelerate does not support a module on one device with a submodule on another)."""

    def covered(name):
        return any(name == key or name.startswith(key + ".") for key in device_map)

    def split(name, module):
        if covered(name):
            return {}
        if not any(key.startswith(name + ".") for key in device_map):
            return {name: "cpu"}
        entries = {f"{name}.{tensor}": "cpu" for tensor, _ in module.named_parameters(recurse=False)}
        for child_name, child in module.named_children():
            if any(True for _ in child.parameters()):
                entries.update(split(f"{name}.{child_name}", child))
        return entries

    result = dict(device_map)
    for name, child in model.named_children():
        result.update(split(name, child))
    return result


@pytest.mark.parametrize("layout", sorted(DEVICE_MAPS))
def test_cpu_and_disk_offload_match_the_plain_load(hub_folder, plain, case, tmp_path, layout):
    input_ids, pixels = case
    device_map = complete(DEVICE_MAPS[layout], plain)
    with warnings.catch_warnings():  # tensor-level keys (the tower's cls_token) "do not match any submodules"
        warnings.simplefilter("ignore", UserWarning)
        model = AutoModelForCausalLM.from_pretrained(
            hub_folder, trust_remote_code=True, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path)
        ).eval()
    assert "disk" in set(model.hf_device_map.values()) and "cpu" in set(model.hf_device_map.values())
    with torch.no_grad():
        torch.testing.assert_close(model.get_vision_embedding(pixels), plain.get_vision_embedding(pixels), atol=1e-5, rtol=0)
        offloaded = model(input_ids=input_ids, pixel_values=pixels).logits
        reference = plain(input_ids=input_ids, pixel_values=pixels).logits
        torch.testing.assert_close(offloaded, reference, atol=1e-4, rtol=0)

        generate = dict(do_sample=False, max_new_tokens=8)
        tokens = model.generate(input_ids, pixel_values=pixels, **generate)
        reference_tokens = plain.generate(input_ids, pixel_values=pixels, **generate)
    assert tokens.tolist() == reference_tokens.tolist()
