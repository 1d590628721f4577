"""Comparison 1 of `omnilmm-bench`: image preprocessing."""

from ..remote import remote_module
from .common import Bench, fmt_s, header, median, paired_ratio, synthetic_photo


def bench_preprocessing(bench: Bench):
    from transformers import LlavaNextImageProcessor, LlavaNextImageProcessorPil

    header("1. Image preprocessing, slice mode, up to 9 tiles + overview (images/second, one image per call)")
    image_processing = remote_module("image_processing_omnilmm")
    # Ours per backend: the PIL class (bit-exact to the original, what saved folders load) and the torchvision one.
    ours = {
        "ours (PIL)": image_processing.OmniLMMImageProcessor(slice_mode=True, max_slice_nums=9),
        "ours (torchvision)": image_processing.OmniLMMImageProcessorFast(slice_mode=True, max_slice_nums=9),
    }
    # LLaVA-NeXT with 336-px tiles and every grid of up to 9 tiles (LLaVA-OneVision's "anyres_max_9" idea):
    # the same job, up to 9 tiles + an overview per image.
    pinpoints = [[336 * c, 336 * r] for c in range(1, 10) for r in range(1, 10) if c * r <= 9]
    llava_kwargs = dict(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints
    )
    peers = {
        "LLaVA-NeXT (PIL)": LlavaNextImageProcessorPil(**llava_kwargs),
        "LLaVA-NeXT (torchvision)": LlavaNextImageProcessor(**llava_kwargs),
    }
    pairs = {"LLaVA-NeXT (PIL)": "ours (PIL)", "LLaVA-NeXT (torchvision)": "ours (torchvision)"}  # same backend
    reps = bench.preset["reps"]["preprocess"]
    for width, height in bench.preset["photos"]:
        photo = synthetic_photo(width, height)
        contenders = {name: (lambda processor=processor: processor(photo)) for name, processor in ours.items()}
        for name, processor in peers.items():
            contenders[name] = lambda processor=processor: processor(photo, return_tensors="pt")
        shapes = {
            **{name: len(p(photo)["pixel_values"][0]) for name, p in ours.items()},
            **{name: tuple(p(photo, return_tensors="pt")["pixel_values"].shape[1:2]) for name, p in peers.items()},
        }
        times = bench.alternate(contenders, reps)
        rate = {name: 1 / median(t) for name, t in times.items()}
        print(
            f"  {width}x{height} ({width * height / 1e6:.1f} MP): "
            + ", ".join(f"{name} {rate[name]:.2f} img/s" for name in times)
            + f"  [tiles per image: ours {shapes['ours (PIL)']}, LLaVA-NeXT {shapes['LLaVA-NeXT (PIL)'][0]}]",
            flush=True,
        )
        for name, mine in pairs.items():
            bench.add(
                "1 preprocessing",
                f"{width}x{height}: {mine} / {name} (images/s)",
                paired_ratio(times[name], times[mine]),
                "> 1.00",
                f"{mine} {fmt_s(median(times[mine]))}/image, {name} {fmt_s(median(times[name]))}/image",
            )
