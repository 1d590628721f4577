#!/usr/bin/env bash
# Rebuild demo_model/: a tiny OmniLMM (real Mistral v0.1 tokenizer, slicing on) trained from scratch on the
# synthetic shapes task, on CPU, in two stages. About 12 minutes on 2 CPU cores; prints the wall time of each part.
# Usage: scripts/train_demo.sh [OUTPUT_DIR]   (default: demo_model/ of this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-demo_model}
RUNS=${RUNS:-runs}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)

# 1. Training data: shapes images + MiniCPM-V-format JSON (seed 0; evaluation uses other seeds).
python -m omnilmm_tools.shapes --out "$RUNS/shapes-train" --n 6400 --seed 0
echo "data: $(( $(date +%s) - start )) s"

# 2. Stage 1: the vision tower and resampler of a fresh model (configs/demo_model.json) learn to see the shapes,
#    through small classification heads that are thrown away (the language model is not in the loop: cheap).
python scripts/pretrain_demo_vision.py --init-config configs/demo_model.json --output "$RUNS/demo-stage1" \
  --steps 600 --batch-size 64 --lr 1e-3 --seed 0
echo "stage 1 done: $(( $(date +%s) - start )) s"

# 3. Stage 2: the language model learns to answer, on the chat data, with the vision tower frozen
#    (omnilmm-finetune: the same command users run); fp16 weights and a greedy generation config.
rm -rf "$OUTPUT"
omnilmm-finetune \
  --model "$RUNS/demo-stage1" \
  --data "$RUNS/shapes-train/data.json" \
  --output "$OUTPUT" \
  --no-tune-vision \
  --max-steps 400 --batch-size 16 --lr 1.5e-3 --warmup 30 --lr-scheduler cosine \
  --seed 0 --logging-steps 25 \
  --save-dtype float16 --generation-config greedy
cp "$RUNS/demo-stage1/stage1_log.json" "$OUTPUT/"

# 4. Keep the folder small: the training logs stay, checkpoints never get written (no --save-steps). Its card.
python - "$OUTPUT" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoConfig
from omnilmm_tools.model_card import demo_model_card
out = Path(sys.argv[1])
(out / "README.md").write_text(demo_model_card(AutoConfig.from_pretrained(out, trust_remote_code=True)))
log = json.loads((out / "train_log.json").read_text())
losses = [e["loss"] for e in log["log_history"] if "loss" in e]
size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
print(f"stage 2 losses: first {losses[0]:.3f}, last {losses[-1]:.3f}; folder {size / 1e6:.1f} MB")
PY
echo "wall time: $(( $(date +%s) - start )) s"

# 5. Check it on images no training run saw.
omnilmm-eval-shapes --model "$OUTPUT" --seed 2024 --n 200
