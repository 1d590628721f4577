"""Print the max abs difference of every fixture tensor (the original release vs this port) and the 12B meta-build time.

Run from the repository root: `python scripts/parity_report.py`.
"""
import sys, time, json, torch, tempfile
sys.path.insert(0, "tests")
from test_model import fixture_pixels, IMAGES, TINY, FIXTURES
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
import transformers, timm
from omnilmm_tools.convert import convert
from omnilmm_tools.remote import remote_module
e = load_file(str(TINY / "expected.safetensors"))
d = convert(TINY / "original", tempfile.mkdtemp() + "/hub")
m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    for n in IMAGES:
        p = fixture_pixels(n)[None]; t = m.model.vision_tower
        print(f"vision_tower.{n}: {(t.forward_features(p)[0,1:]-e['vision_tower.'+n]).abs().max().item():.2e}")
        print(f"vision.{n}: {(m.get_vision_embedding(p)[0]-e['vision.'+n]).abs().max().item():.2e}")
    ids = e["case_image.input_ids"].long()
    o = m(input_ids=ids, pixel_values=fixture_pixels("photo_640x480")[None], labels=e["case_image.labels"].long())
    print(f"case_image.logits: {(o.logits[0]-e['case_image.logits']).abs().max().item():.2e}")
    print(f"case_image.loss: {abs(o.loss.item()-e['case_image.loss'].item()):.2e}")
    o = m(input_ids=e["case_text.input_ids"].long())
    print(f"case_text.logits: {(o.logits[0]-e['case_text.logits']).abs().max().item():.2e}")
    g = m.generate(ids, pixel_values=fixture_pixels("photo_640x480")[None], do_sample=False, max_new_tokens=12)
    print("case_generate tokens identical:", g[0, ids.shape[1]:].tolist() == e["case_generate.new_tokens"].long().tolist())
C = remote_module("configuration_omnilmm").OmniLMMConfig(**json.loads((FIXTURES/"omnilmm-12b"/"config.json").read_text()))
t = time.perf_counter()
with torch.device("meta"):
    big = remote_module("modeling_omnilmm").OmniLMMForCausalLM(C)
print(f"12B meta build: {time.perf_counter()-t:.2f} s")
print("transformers", transformers.__version__, "timm", timm.__version__, "torch", torch.__version__)
