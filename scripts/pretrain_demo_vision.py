"""Stage 1 of the demo model: pretrain a fresh OmniLMM's vision tower and resampler on the shapes task.

Real VLMs start from a pretrained vision encoder (OmniLMM: EVA02-CLIP). The demo starts from nothing, and a
vision transformer trained from scratch needs tens of thousands of images to tell a triangle from a star, far more
than the language model can read in the demo's CPU budget. So, as CLIP pretraining does for the real model, this
stage teaches the vision side alone, cheaply (no 32,009-token language model in the loop): linear heads on the
mean of the resampler's outputs predict the shape, colour, count and position of freshly generated images, seen
through the image processor exactly as the model sees them (the overview and the tile that holds the shape).
The heads are thrown away; the result is a Hub folder for `omnilmm-finetune --model` (stage 2).

    python scripts/pretrain_demo_vision.py --init-config configs/demo_model.json --output runs/demo-stage1
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from omnilmm_tools import finetune, shapes  # noqa: E402

TASKS = {"shape": list(shapes.SHAPES), "colour": list(shapes.COLOURS), "count": list(shapes.COUNT_WORDS),
         "position": list(shapes.POSITIONS)}


def make_batch(rng, image_processor, batch_size, size):
    """Views (3, H, W) of `batch_size` fresh scenes and their labels per task (-100: not asked of that view)."""
    views, labels = [], {task: [] for task in TASKS}

    def add(view, **answers):
        views.append(view)
        for task, values in TASKS.items():
            labels[task].append(values.index(answers[task]) if task in answers else -100)

    for _ in range(batch_size):
        roll = rng.random()
        region = rng.choice(shapes.POSITIONS) if roll < 0.3 else None
        count = 1 if roll < 0.7 else rng.choice((2, 3))
        scene = shapes.random_scene(rng, count, size, region)
        image = shapes.draw(scene, rng, size)
        features = image_processor([[image]])
        source, *tiles = features["pixel_values"][0]
        grid = features["slice_grids"][0][0]
        if count == 1:
            target = scene[0]
            answers = {"shape": target.kind, "colour": target.colour, "count": 1}
            add(source, **answers, **({"position": region} if region else {}))
            if grid is not None:  # the tile that holds the shape's centre, at full resolution
                cols, rows = grid
                col, row = min(int(target.x * cols / size), cols - 1), min(int(target.y * rows / size), rows - 1)
                add(tiles[row * cols + col], shape=target.kind, colour=target.colour)
        else:
            add(source, count=count)
    return views, {task: torch.tensor(values) for task, values in labels.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init-config", required=True, help="OmniLMMConfig JSON (as omnilmm-finetune --init-config)")
    parser.add_argument("--output", required=True, help="Hub folder to write (the stage-2 starting point)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64, help="scenes per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=shapes.IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, processor = finetune.init_from_config(args.init_config)
    inner = model.model
    heads = torch.nn.ModuleDict({task: torch.nn.Linear(model.config.hidden_size, len(values)) for task, values in TASKS.items()})
    parameters = [*inner.vision_tower.parameters(), *inner.resampler.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )  # linear warmup, then cosine decay
    rng = random.Random(f"omnilmm-demo-vision-{args.seed}")
    start, history, log = time.time(), [], []
    progress = tqdm(range(args.steps), desc="stage 1 (vision)")
    for step in progress:
        views, labels = make_batch(rng, processor.image_processor, args.batch_size, args.size)
        pooled = inner.get_vision_embedding([views]).mean(dim=1)  # (views, hidden): mean over the query tokens
        losses, correct = [], {}
        for task, head in heads.items():
            logits = head(pooled)
            mask = labels[task] != -100
            if mask.any():
                losses.append(F.cross_entropy(logits[mask], labels[task][mask]))
                correct[task] = (logits[mask].argmax(-1) == labels[task][mask]).float().mean().item()
        loss = sum(losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(correct)
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            recent = history[-50:]  # accuracy on the last 50 batches: fresh scenes, never seen before
            accuracy = {task: sum(h[task] for h in recent if task in h) / max(1, sum(task in h for h in recent)) for task in TASKS}
            log.append({"step": step + 1, "loss": loss.item(), "seconds": time.time() - start, "accuracy": accuracy})
            progress.set_postfix(loss=f"{loss.item():.3f}", **{task: f"{value:.0%}" for task, value in accuracy.items()})
            tqdm.write(f"step {step + 1}/{args.steps} loss {loss.item():.3f} "
                       + " ".join(f"{task} {value:.0%}" for task, value in accuracy.items()))
    finetune.save_hub_folder(model, processor, Path(args.output), decoding="greedy")
    summary = {"steps": args.steps, "batch_size": args.batch_size, "seconds": time.time() - start, "log": log}
    (Path(args.output) / "stage1_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.output} (vision tower and resampler pretrained; language model untouched)")


if __name__ == "__main__":
    main()
