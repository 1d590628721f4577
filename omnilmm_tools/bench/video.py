"""Comparison 9 of `omnilmm-bench`: video.

- Decoding and sampling a 3-minute 720p H.264 clip to MiniCPM-V's 64 frames: the OmniLMM video processor (it seeks
  to each kept frame and skips the frames nothing refers to) against decoding every frame and keeping the sampled ones
  (what transformers' PyAV loader and vLLM's OpenCV loader do, and the recipe users copy, without converting the
  frames it drops). Twice: keyframes every second (phone recordings) and every 10 s (x264's default), each with its
  count of frames decoded. Against MiniCPM-V's decord recipe, vLLM's own OpenCV loader and transformers' default
  backend (torchcodec, exact seeking) too, where those are installed.
- What a second of video costs the model at the default settings: its tokens, and the vision encoding time of its
  frames on the bench's random model, for 64 and 256 tokens per view.
"""

import tempfile
from pathlib import Path

import av
import numpy as np
import torch

from .. import clips
from ..remote import remote_module
from .common import build_processor, fmt_s, header, median, omnilmm_config, paired_ratio, random_model

CLIPS = {"smoke": dict(seconds=20, size=(64, 48), fps=30), "cpu": dict(seconds=180, size=(1280, 720), fps=30),
         "gpu": dict(seconds=180, size=(1280, 720), fps=30)}


def synthetic_frames(count, width, height, seed=0):
    """Textured frames with motion (noise scrolling under a moving bar), made one at a time."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for i in range(count):
        frame = np.roll(base, 4 * i, axis=1)
        frame[:, (8 * i) % width : (8 * i) % width + 16] = (255, 40, 40)
        yield frame


def decode_every_frame(path, indices):
    """Every frame decoded, the sampled ones kept as RGB arrays."""
    wanted = set(indices)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return [frame.to_ndarray(format="rgb24") for i, frame in enumerate(container.decode(stream)) if i in wanted]


def decord_recipe(path):
    """MiniCPM-V's `encode_video` with decord, as its model card has it (the frames kept as arrays)."""
    from decord import VideoReader, cpu

    reader = VideoReader(str(path), ctx=cpu(0))
    frame_idx = list(range(0, len(reader), round(reader.get_avg_fps())))
    if len(frame_idx) > 64:
        gap = len(frame_idx) / 64
        frame_idx = [frame_idx[int(i * gap + gap / 2)] for i in range(64)]
    return list(reader.get_batch(frame_idx).asnumpy())


def vllm_opencv_loader(path, count):
    """vLLM's default video loader (OpenCV), asked for as many frames."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    return VIDEO_LOADER_REGISTRY.load("opencv").load_bytes(Path(path).read_bytes(), num_frames=count)[0]


def torchcodec_exact(path, indices):
    """transformers' default video backend: torchcodec's decoder in its exact seek mode, the same frames."""
    from torchcodec.decoders import VideoDecoder

    return VideoDecoder(str(path), seek_mode="exact").get_frames_at(indices=indices).data


def optional(name):
    """Whether `name` imports."""
    try:
        __import__(name)
        return True
    except (ImportError, OSError, RuntimeError):
        return False


def torchcodec_decodes() -> bool:
    """Whether torchcodec decodes here: its wheel imports anywhere but loads FFmpeg's libraries from the system at
    its first decode, and fails there on a machine without them."""
    from ..remote import ROOT

    try:
        from torchcodec.decoders import VideoDecoder

        VideoDecoder(str(ROOT / "assets" / "sample.mp4"))[0]
        return True
    except Exception:  # noqa: BLE001 - whatever stops it, there is no torchcodec row
        return False


def bench_video(bench, preset_name: str):
    header("9. Video: decode and sample a clip to 64 frames (ours seeks; the others decode every frame), and what a "
           "second of video costs")
    spec, reps = CLIPS[preset_name], bench.preset["reps"].get("video", 2)
    processor = remote_module("video_processing_omnilmm").OmniLMMVideoProcessor()
    (width, height), count = spec["size"], spec["seconds"] * spec["fps"]
    with tempfile.TemporaryDirectory(prefix="omnilmm-bench-video-") as folder:
        for every in (1, 10):  # keyframes every second (phones), every 10 s (x264's default)
            gop = every * spec["fps"]
            path = clips.write_video(Path(folder) / f"gop{gop}.mp4", synthetic_frames(count, width, height),
                                     spec["fps"], gop=gop, preset="ultrafast")
            frames, metadata = processor.load(str(path))
            indices = metadata.frames_indices
            contenders = {"ours": lambda: processor.load(str(path)),
                          "every frame": lambda: decode_every_frame(path, indices)}
            if optional("decord"):
                contenders["decord recipe"] = lambda: decord_recipe(path)
            if optional("vllm.multimodal.video") and optional("cv2"):
                contenders["vLLM OpenCV loader"] = lambda: vllm_opencv_loader(path, len(indices))
            if torchcodec_decodes():
                contenders["torchcodec"] = lambda: torchcodec_exact(path, indices)
            assert all(np.array_equal(a, b) for a, b in zip(frames, decode_every_frame(path, indices)))
            with clips.count_decoded_frames() as decoded:
                processor.load(str(path))
            times = bench.alternate(contenders, reps)
            what = f"{spec['seconds']} s {height}p, keyframe every {every} s, {len(indices)} frames"
            detail = (f"ours {fmt_s(median(times['ours']))}, every frame {fmt_s(median(times['every frame']))}; "
                      f"ours decodes {decoded[0]} of the {count} frames")
            bench.add("9 video", f"{what}: ours / every frame", paired_ratio(times["every frame"], times["ours"]),
                      ">= 5.00" if every == 1 else "info", detail)
            for name in set(contenders) - {"ours", "every frame"}:
                bench.add("9 video", f"{what}: ours / {name}", paired_ratio(times[name], times["ours"]), "info",
                          f"{name} {fmt_s(median(times[name]))}")
        costs = video_costs(bench, frames, metadata)
    for num_query, (tokens, seconds) in costs.items():
        per_second = metadata.total_num_frames / metadata.fps
        bench.add("9 video", f"tokens per second of video, {num_query} per view", tokens / per_second, "info",
                  f"{tokens} tokens for the {len(frames)} frames of the {spec['seconds']} s clip")
        bench.add("9 video", f"vision encoding, ms per second of video, {num_query} per view",
                  1000 * seconds / per_second, "info",
                  f"{fmt_s(seconds)} for its {len(frames)} frames on the bench's random model")


def video_costs(bench, frames, metadata):
    """num_query -> (the clip's tokens, the seconds to encode its frames), at OmniLMM-12B's square 448-pixel views."""
    costs = {}
    processor = build_processor(slice_mode=False)
    for num_query in (64, 256):
        config = omnilmm_config(bench.preset["model"])
        config.num_query = num_query
        model = random_model(config, bench.device, torch.float32 if bench.device.type == "cpu" else torch.bfloat16)
        processor.num_query = num_query
        views = processor.video_processor(frames, video_metadata=metadata, do_sample_frames=False)
        pixels = torch.stack(views["pixel_values_videos"][0]).to(bench.device)
        with torch.no_grad():
            times = bench.alternate({"encode": lambda: model.get_image_features(pixels)}, reps=1)
        tokens = processor._get_num_multimodal_tokens(video_sizes=[views["video_sizes"][0]])["num_video_tokens"][0]
        costs[num_query] = (tokens, median(times["encode"]))
        del model
    return costs


__all__ = ["bench_video", "synthetic_frames"]
