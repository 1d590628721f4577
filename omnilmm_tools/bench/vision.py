"""Comparison 2 of `omnilmm-bench`: vision encoding."""

import torch

from ..remote import remote_module
from .common import Bench, fmt_s, gemm_ceiling, header, median, paired_ratio, synthetic_photo


def tile_pixels(bench: Bench):
    processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(slice_mode=True)
    out = processor(synthetic_photo(*bench.preset["tile_image"]))
    return out["pixel_values"][0], out["slice_grids"][0][0]


def bench_vision(bench: Bench, model):
    header("2. Vision encoding of a sliced image (overview + 9 tiles): batched vs one tile at a time")
    images, grid = tile_pixels(bench)
    images = [image.to(bench.device) for image in images]
    print(f"  {len(images)} images: overview {tuple(images[0].shape[1:])}, grid {grid}, tiles {tuple(images[1].shape[1:])}")

    def batched():
        with torch.inference_mode():
            return model.get_vision_embedding([images])

    def one_by_one():
        with torch.inference_mode():
            return torch.cat([model.get_vision_embedding(image[None]) for image in images])

    difference = float((batched().float() - one_by_one().float()).abs().max())  # also the warm-up of both
    times = bench.alternate({"batched": batched, "one at a time": one_by_one}, bench.preset["reps"]["vision"], warmup=0)
    fc1 = model.model.vision_tower.blocks[0].mlp.fc1.weight
    tokens = (images[1].shape[1] // 14) * (images[1].shape[2] // 14) + 1
    ceiling, t_one, t_many = gemm_ceiling(bench, fc1, tokens, len(images) - 1)
    bench.add(
        "2 vision",
        "batched get_vision_embedding speed-up over one tile at a time",
        paired_ratio(times["one at a time"], times["batched"]),
        # a CPU is busy with one ~1,000-token tile already: there the row is measured against its GEMM limit
        ">= 3.00" if bench.device.type == "cuda" else "info",
        f"batched {fmt_s(median(times['batched']))}, one at a time {fmt_s(median(times['one at a time']))} "
        f"({len(images)} images, largest difference {difference:.1e}). Limit here: the EVA MLP GEMM on {len(images) - 1} tiles at once is "
        f"{ceiling:.2f}x faster than tile by tile ({fmt_s(t_many)} vs {len(images) - 1} x {fmt_s(t_one)})",
    )
