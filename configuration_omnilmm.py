"""OmniLMM configuration: a Mistral decoder config plus the vision tower, resampler and image-token settings."""

import math

from transformers import MistralConfig

AUTO_MAP = {
    "AutoConfig": "configuration_omnilmm.OmniLMMConfig",
    "AutoModel": "modeling_omnilmm.OmniLMMModel",
    "AutoModelForCausalLM": "modeling_omnilmm.OmniLMMForCausalLM",
    "AutoModelForImageTextToText": "modeling_omnilmm.OmniLMMForCausalLM",
}


class OmniLMMConfig(MistralConfig):
    r"""
    Configuration of an OmniLMM model. The defaults are OmniLMM-12B's; the original release's
    `config.json` (with `torch_dtype`, a top-level `rope_theta`, `fully_tune`, `tune_CLIP`, ...) loads unchanged.

    Args (besides [`MistralConfig`]'s):
        mm_vision_tower (`str`): timm name of the vision tower, built with `pretrained=False`.
        vision_tower_kwargs (`dict`): extra `timm.create_model` keyword arguments (`{}` for the real model;
            tests use it to make the tower tiny, e.g. `{"embed_dim": 64, "depth": 3}`).
        num_query (`int`): query tokens the resampler makes per image (= `<im_patch>` tokens per image span).
        image_size (`int`): side of the square image in the square (non-sliced) layout.
        mm_use_im_start_end (`bool`): image spans are framed by `<im_start>`/`<im_end>`; must be true.
        im_patch_token_id, im_start_token_id, im_end_token_id (`int`): the image-span token ids.
        vision_batch_size (`int`): at most this many images go through the vision tower in one forward.
    """

    model_type = "omnilmm"
    attribute_map = {"image_token_id": "im_patch_token_id"}  # the name generation and engines look for

    vocab_size: int = 32009
    max_position_embeddings: int = 32768
    mm_vision_tower: str = "eva02_enormous_patch14_clip_224.laion2b_plus"
    vision_tower_kwargs: dict | None = None
    num_query: int = 256
    image_size: int = 448
    mm_use_im_start_end: bool = True
    im_patch_token_id: int = 32000
    im_start_token_id: int = 32001
    im_end_token_id: int = 32002
    vision_batch_size: int = 16

    def __post_init__(self, **kwargs):
        if not isinstance(self.vision_tower_kwargs or {}, dict):
            raise TypeError(f"`vision_tower_kwargs` must be a dict (timm arguments), not {self.vision_tower_kwargs!r}")
        self.vision_tower_kwargs = dict(self.vision_tower_kwargs or {})
        if not isinstance(self.mm_vision_tower, str):
            raise TypeError(f"`mm_vision_tower` must be a timm model name, got {self.mm_vision_tower!r}.")
        if not self.mm_use_im_start_end:
            raise ValueError(
                "OmniLMM image spans are always <im_start> <im_patch>... <im_end>: set `mm_use_im_start_end=True`."
            )
        for name in ("num_query", "image_size", "hidden_size", "vision_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if math.isqrt(self.num_query) ** 2 != self.num_query:
            raise ValueError(f"`num_query` must be a square number (the resampler's grid), got {self.num_query}.")
        if self.hidden_size < 128:  # the resampler has hidden_size // 128 heads
            raise ValueError(f"`hidden_size` must be at least 128 (the resampler's heads), got {self.hidden_size}.")
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__post_init__(**kwargs)


__all__ = ["OmniLMMConfig"]
