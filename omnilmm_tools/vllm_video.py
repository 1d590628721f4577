"""OmniLMM's video loader for vLLM: `video_url` parts (a `data:video/...;base64,` URL, an http(s) URL, a local file
under `--allowed-local-media-path`) are decoded and sampled by the OmniLMM video processor itself (MiniCPM-V's
sampling, only the kept frames decoded), so vLLM gets the frames `model.chat()` gets from the same file.

vLLM uses it for every folder whose video processor is `OmniLMMVideoProcessor` (`video_preprocessor_config.json`).
Its settings, per server (`--media-io-kwargs '{"video": {"fps": 2, "max_num_frames": 32}}'`) or per request
(`media_io_kwargs`), are the video processor's: `fps` (1) and `max_num_frames` (64). vLLM's generic `num_frames`
(always passed, 32 by default) is not one of them and is not used.
"""

import numpy as np

from .remote import remote_module

BACKEND = "omnilmm"


class OmniLMMVideoLoader:
    """A vLLM `VideoLoader` (registered as `omnilmm` by `register`)."""

    @classmethod
    def load_bytes(cls, data: bytes, num_frames: int = -1, fps: float | None = None, max_num_frames: int | None = None,
                   **kwargs):
        """The sampled frames `(n, h, w, 3)` uint8 and their metadata (the video processor's, `frames_indices` among
        them; `do_sample_frames=False`: the frames are sampled already)."""
        processor = remote_module("video_processing_omnilmm").OmniLMMVideoProcessor()
        frames, metadata = processor.load(data, fps=fps, max_num_frames=max_num_frames)
        return np.stack(frames), {**dict(metadata), "video_backend": BACKEND, "do_sample_frames": False}


def register() -> None:
    """Register the loader with vLLM, for the folders whose video processor is OmniLMM's."""
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY, VideoLoader

    if BACKEND not in VIDEO_LOADER_REGISTRY.name2class:
        loader = type("OmniLMMVideoLoader", (OmniLMMVideoLoader, VideoLoader), {})
        VIDEO_LOADER_REGISTRY.register(BACKEND, video_processor="OmniLMMVideoProcessor")(loader)
