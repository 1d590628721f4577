"""Weight-only int8/int4 loading on the CPU (transformers' `QuantoConfig`, optimum-quanto), as the README's "Run on
a laptop" section gives it: a converted folder and the demo model load quantized and answer through `chat()`, and
int8 keeps the demo model's evaluation within 2 points of bf16."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, QuantoConfig

from conftest import ROOT, make_original_folder, run_converter
from omnilmm_tools import eval_shapes

DEMO_MODEL = ROOT / "demo_model"
NOT_QUANTIZED = ["lm_head", "model.resampler"]  # the README's choice (the resampler's attention reads its weights)


def quantized(folder, weights):
    config = QuantoConfig(weights=weights, modules_to_not_convert=NOT_QUANTIZED)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                quantization_config=config).eval()


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_converted_folder_loads_quantized_and_chats(tmp_path, weights):
    folder = run_converter(make_original_folder(tmp_path / "original"), tmp_path / "hub")
    model = quantized(folder, weights)
    quantized_layers = {type(model.model.layers[0].mlp.up_proj).__name__,
                        type(model.model.vision_tower.blocks[0].attn.qkv).__name__}
    assert quantized_layers == {"QLinear"} and type(model.lm_head).__name__ == "Linear"
    answer = model.chat(image=torch.zeros(3, 60, 80, dtype=torch.uint8), msgs=[{"role": "user", "content": "Hi?"}],
                        sampling=False, max_new_tokens=3, min_new_tokens=3)
    assert isinstance(answer, str)


def test_int8_keeps_the_demo_models_accuracy_within_two_points():
    processor = AutoProcessor.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    seed, n = 2027, 200  # a seed no training run used
    accuracy = {}
    for weights in ("bf16", "int8", "int4"):
        model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.bfloat16).eval() \
            if weights == "bf16" else quantized(DEMO_MODEL, weights)
        accuracy[weights] = eval_shapes.evaluate(model, processor, seed, n)["accuracy"]
    print({weights: round(result["all"], 3) for weights, result in accuracy.items()})
    assert abs(accuracy["int8"]["all"] - accuracy["bf16"]["all"]) <= 0.02, accuracy
    assert accuracy["int4"]["colour"] >= 0.9, accuracy  # int4 still reads the picture
