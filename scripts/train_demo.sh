#!/usr/bin/env bash
# Rebuild demo_model/: a tiny OmniLMM (real Mistral v0.1 tokenizer, slicing on) trained from scratch on the
# synthetic shapes task, on CPU. Takes about 10-15 minutes on 2 CPU cores; prints the wall time.
# Usage: scripts/train_demo.sh [OUTPUT_DIR]   (default: demo_model/ of this checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT=${1:-demo_model}
DATA=${DATA:-runs/shapes-train}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)

# 1. Training data: shapes images + MiniCPM-V-format JSON (seed 0; evaluation uses other seeds).
python -m omnilmm_tools.shapes --out "$DATA" --n 12000 --seed 0

# 2. Train from a fresh random model (configs/demo_model.json), save fp16 weights and a greedy generation config.
rm -rf "$OUTPUT"
omnilmm-finetune \
  --init-config configs/demo_model.json \
  --data "$DATA/data.json" \
  --output "$OUTPUT" \
  --max-steps 600 --batch-size 16 --lr 1.5e-3 --warmup-ratio 0.03 --lr-scheduler cosine \
  --seed 0 --logging-steps 25 \
  --save-dtype float16 --greedy-generation-config

# 3. Keep the folder small: the training log stays, checkpoints never get written (no --save-steps).
python - "$OUTPUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
log = json.loads((out / "train_log.json").read_text())
losses = [e["loss"] for e in log["log_history"] if "loss" in e]
size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
print(f"losses: first {losses[0]:.3f}, last {losses[-1]:.3f}; folder {size / 1e6:.1f} MB")
PY
echo "wall time: $(( $(date +%s) - start )) s"

# 4. Check it on images no training run saw.
omnilmm-eval-shapes --model "$OUTPUT" --seed 2024 --n 200
