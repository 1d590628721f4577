"""One process of tests/test_quantization.py's memory checks: `python quantized_child.py FOLDER MODE` loads FOLDER
and prints its greedy answer about the sample picture as JSON. MODE: `quantized` (a folder omnilmm-quantize wrote,
as it is), `int4-on-load` (a full-precision folder through transformers' QuantoConfig), `baseline` (everything
but the model: the imports, the processor and the question; prints nothing)."""

import json
import sys
from pathlib import Path

import optimum.quanto  # noqa: F401 - part of the runtime in every mode
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, QuantoConfig

from omnilmm_tools.quantize import KEEP

folder, mode = sys.argv[1:]
AutoConfig.from_pretrained(folder, trust_remote_code=True)  # imports the remote code
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
image = Image.open(Path(__file__).resolve().parent.parent / "assets" / "sample.png")
msgs = [{"role": "user", "content": "What colour is the shape?"}]
if mode != "baseline":
    quantization = QuantoConfig(weights="int4", modules_to_not_convert=list(KEEP))
    kwargs = {"dtype": torch.bfloat16, "quantization_config": quantization} if mode == "int4-on-load" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs)
    answer = model.chat(image=image, msgs=msgs, processor=processor, sampling=False, max_new_tokens=8)
    print(json.dumps({"answer": answer}))
