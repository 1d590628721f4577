"""Weight-only int8/int4 on the CPU (optimum-quanto), as the README's "Run on a laptop" gives it: `omnilmm-quantize`
writes a folder that `from_pretrained` loads quantized as it is (the layers transformers' `QuantoConfig` would
compute at every load, bit for bit), within a memory limit of the folder's own size, and the demo model keeps its
evaluation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, QuantoConfig

from conftest import ROOT, drop_page_cache, make_original_folder, run_converter, run_in_memory_cgroup
from omnilmm_tools import eval_shapes
from omnilmm_tools.bench import build_processor, omnilmm_config, random_model
from omnilmm_tools.finetune import save_hub_folder
from omnilmm_tools.quantize import KEEP, quantize_folder

DEMO_MODEL = ROOT / "demo_model"
CHILD = [sys.executable, str(ROOT / "tests" / "quantized_child.py")]
QUESTION = [{"role": "user", "content": "What colour is the shape?"}]
# decoder-heavy like the 12B: 12 Mistral layers of half the real width (1.6 GB in bf16, 0.6 GB in int4)
DECODER_HEAVY = dict(vision=dict(embed_dim=1024, depth=2, num_heads=16, mlp_ratio=4.0), hidden_size=2048,
                     num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4, intermediate_size=7168)


def quantized_on_load(folder, weights):
    """transformers' own way: the full-precision folder, quantized while loading."""
    config = QuantoConfig(weights=weights, modules_to_not_convert=list(KEEP))
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                quantization_config=config).eval()


def plain(tensor):
    return tensor.dequantize() if hasattr(tensor, "dequantize") else tensor


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_a_quantized_folder_loads_what_quantizing_on_load_computes_and_chats(tmp_path, weights):
    folder = run_converter(make_original_folder(tmp_path / "original"), tmp_path / "hub")
    quantize_folder(folder, tmp_path / weights, weights)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / weights, trust_remote_code=True, dtype=torch.bfloat16)
    expected = quantized_on_load(folder, weights)
    layers = {type(model.model.layers[0].mlp.up_proj).__name__,
              type(model.model.vision_tower.blocks[0].attn.qkv).__name__}
    assert layers == {"QLinear"} and type(model.lm_head).__name__ == "Linear"
    state, expected_state = model.state_dict(), expected.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(plain(state[key]), plain(expected_state[key])) for key in state)
    image = torch.zeros(3, 60, 80, dtype=torch.uint8)
    answers = [m.chat(image=image, msgs=QUESTION, sampling=False, max_new_tokens=4, min_new_tokens=4)
               for m in (model, expected)]
    assert answers[0] == answers[1]


def test_a_quantized_folder_and_the_quantize_command_fit_their_memory_bounds(tmp_path):
    """The laptop's case, enforced: the quantized folder loads and answers inside a memory cgroup limited to the
    runtime's baseline plus 1.25x its weights, where quantizing the full-precision folder at load is killed; and
    `omnilmm-quantize` itself runs in the baseline plus four of the model's largest tensors."""
    full, quantized = tmp_path / "bf16", tmp_path / "int4"
    model = random_model(omnilmm_config(DECODER_HEAVY), torch.device("cpu"), torch.bfloat16)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    save_hub_folder(model, build_processor(slice_mode=False), full)
    del model
    _, baseline = run_in_memory_cgroup(CHILD + [str(full), "baseline"])
    stream_limit = baseline + 4 * max(sizes)
    assert 4 * max(sizes) < sum(sizes) / 2  # (a bound that holding the model would break)
    drop_page_cache(full)
    result, _ = run_in_memory_cgroup([sys.executable, "-m", "omnilmm_tools.quantize", str(full), str(quantized)],
                                     stream_limit)
    assert result.returncode == 0, f"omnilmm-quantize in {stream_limit / 1e9:.2f} GB: {result.stderr[-3000:]}"

    weights = (quantized / "model.safetensors").stat().st_size
    assert weights < 0.45 * sum(sizes)  # (the embedding and LM head, 16% of this model, stay bf16)
    limit = baseline + 1.25 * weights
    drop_page_cache(quantized)
    result, peak = run_in_memory_cgroup(CHILD + [str(quantized), "quantized"], limit)
    assert result.returncode == 0, f"loading in {limit / 1e9:.2f} GB: {result.stderr[-3000:]}"
    print(f"baseline {baseline / 1e9:.2f} GB, int4 weights {weights / 1e9:.2f} GB, loading and answering peaked at "
          f"{(peak - baseline) / weights:.2f}x the weights over the baseline")
    answer = json.loads(result.stdout.splitlines()[-1])["answer"]
    model = AutoModelForCausalLM.from_pretrained(quantized, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(quantized, trust_remote_code=True)
    image = Image.open(ROOT / "assets" / "sample.png")
    assert answer == model.chat(image=image, msgs=QUESTION, processor=processor, sampling=False, max_new_tokens=8)

    drop_page_cache(full)
    result, _ = run_in_memory_cgroup(CHILD + [str(full), "int4-on-load"], limit)
    assert result.returncode == -9, "quantizing the bf16 folder at load fit in the limit too: the check proves nothing"


def test_the_demo_model_keeps_its_evaluation_within_two_points(tmp_path):
    """int8 and int4, the rest computing in bfloat16 and in float32 (what a CPU without native bf16 gets)."""
    processor = AutoProcessor.from_pretrained(DEMO_MODEL, trust_remote_code=True)
    seed, n = 2027, 200  # a seed no training run used
    accuracy = {"bf16": eval_shapes.evaluate(AutoModelForCausalLM.from_pretrained(
        DEMO_MODEL, trust_remote_code=True, dtype=torch.bfloat16).eval(), processor, seed, n)["accuracy"]}
    for weights in ("int8", "int4"):
        folder = quantize_folder(DEMO_MODEL, tmp_path / weights, weights)
        for dtype in (torch.bfloat16, torch.float32):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
            accuracy[f"{weights} {dtype}"] = eval_shapes.evaluate(model, processor, seed, n)["accuracy"]
    print({weights: round(result["all"], 3) for weights, result in accuracy.items()})
    assert all(abs(result["all"] - accuracy["bf16"]["all"]) <= 0.02 for result in accuracy.values()), accuracy


def test_a_quantized_folder_computes_in_float32_where_bfloat16_is_emulated(tmp_path):
    """The rest of the model (norms, attention, vision tower, resampler) computes in float32 on a CPU without native
    bf16 (torch held to AVX2 here), by default; the int4 layers, the embedding and the LM head stay as stored."""
    folder = quantize_folder(DEMO_MODEL, tmp_path / "int4", "int4")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print(torch.backends.cpu.get_cpu_capability(), model.model.norm.weight.dtype, "
            "model.model.vision_tower.patch_embed.proj.weight.dtype, type(model.model.layers[0].mlp.up_proj).__name__, "
            "model.lm_head.weight.dtype, model.model.embed_tokens.weight.dtype)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    result = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["AVX2", "torch.float32", "torch.float32", "QLinear", "torch.bfloat16",
                                     "torch.bfloat16"]
    image = Image.open(ROOT / "assets" / "sample.png")
    answers = [AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).chat(
        image=image, msgs=QUESTION, sampling=False, max_new_tokens=8) for dtype in ("float32", "bfloat16")]
    assert answers[0] == answers[1]


def test_quantizing_and_loading_say_what_is_wrong(tmp_path):
    folder = quantize_folder(DEMO_MODEL, tmp_path / "int4", "int4")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_folder(folder, tmp_path / "again")
    with pytest.raises(ValueError, match="leave out `quantization_config`"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                             quantization_config=QuantoConfig(weights="int8"))
    with pytest.raises(ValueError, match="may choose bfloat16 or float32"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float16)
    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.quantize", str(tmp_path / "none"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "not a full-precision" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_chat_command_answers_from_a_quantized_folder(tmp_path):
    folder = quantize_folder(DEMO_MODEL, tmp_path / "int4", "int4")
    image = ROOT / "assets" / "sample.png"
    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.chat_cli", "--model", str(folder), "--image",
                             str(image), "What colour is the shape?"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    expected = model.chat(image=Image.open(image), msgs=QUESTION, sampling=False, max_new_tokens=64)
    assert result.stdout.strip() == expected
