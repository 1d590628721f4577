"""OmniLMM: an EVA02 vision tower (timm), a Perceiver resampler and a Mistral decoder.

Every image becomes `num_query` tokens that replace the `<im_patch>` tokens of one image span
(`<im_start>`, `num_query` x `<im_patch>`, `<im_end>`) of the prompt; the rest is Mistral.
"""

import copy
import hashlib
import math
import os
import threading
from collections import OrderedDict, defaultdict

import timm
from timm.models import eva as timm_eva
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, MistralForCausalLM, MistralModel, TextIteratorStreamer
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel

from .configuration_omnilmm import OmniLMMConfig
from .resampler import Resampler, get_2d_sincos_pos_embed

MAX_FRAMES_WITH_SLICES = 16  # chat(): more images than this in one conversation are encoded unsliced (video)
VISION_CACHE_SIZE = 64  # chat(): the features of this many recent views (images, tiles) are kept for later turns
LM_HEAD_BLOCK = 2048  # CPU decoding: vocabulary rows per block of the LM head (see `lm_head_logits`)

# transformers 5.24 renamed the cache field of model outputs (`past_key_values` before).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class PassThroughBlock(nn.Identity):
    """Stands in for the vision tower's last block, so that its output is the second-to-last layer's.

    timm calls its blocks as `blk(x, rope=..., attn_mask=..., is_causal=...)`: accept and ignore those.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x


def build_vision_tower(config: OmniLMMConfig) -> nn.Module:
    """The timm EVA02 tower, without weights (they come from the checkpoint) and without its last block."""
    # timm initialises every weight in its constructor, even on the meta device (where `from_pretrained` and the
    # converter build the model) where its trunc_normal_ runs through slow Python decompositions: 0.1 s for two EVA
    # blocks, seconds for 63. The checkpoint (or `_init_weights`, for a new model) sets those weights: skip it there.
    skip_init = torch.empty(0).device.type == "meta"
    init_weights = timm_eva.Eva.init_weights
    if skip_init:
        timm_eva.Eva.init_weights = lambda self, *args, **kwargs: None
    try:
        tower = timm.create_model(
            config.mm_vision_tower,
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            dynamic_img_pad=True,
            **config.vision_tower_kwargs,
        )
    finally:
        timm_eva.Eva.init_weights = init_weights
    tower.blocks[-1] = PassThroughBlock()
    # Under a device_map with CPU/disk offload, accelerate loads a module's weights only when that module is
    # *called*. So `encode_images` calls the tower itself (its `forward` returns every token once pooling is off),
    # not `forward_features` (which leaves the tower's own `cls_token`/`pos_embed` on "meta"), and EVA's attention
    # calls its `qkv` layer instead of reading `qkv.weight` for `F.linear` (a meta tensor there: wrong numbers).
    tower.global_pool = ""
    for module in tower.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    return tower


def flatten_images(images) -> list[torch.Tensor] | torch.Tensor:
    """`(N, 3, H, W)` tensor, or a list (per sample) of lists of `(3, H, W)` tensors → a `(N, 3, H, W)` tensor or a
    flat list of `(3, H, W)` tensors in reading order. Raises `ValueError`/`TypeError` on anything else."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be a (num_images, 3, height, width) tensor, got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"pixel_values must be normalised float images (use the processor), got {images.dtype}")
        return images
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"pixel_values must be a tensor or a list per sample of lists of tensors, got {type(images)}")
    flat = []
    for item in images:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    for image in flat:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"pixel_values lists must hold (3, height, width) tensors, got {type(image)}")
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"each image in pixel_values must be a (3, height, width) tensor, got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"pixel_values must be normalised float images (use the processor), got {image.dtype}")
    return flat


def eva_pos_embed(tower) -> torch.Tensor | None:
    """A new tower's absolute positions `(1, prefix + grid_h * grid_w, embed_dim)`: MAE's 2-D sin-cos table for the
    patches, zeros for the class token. (timm's random 0.02 table is too faint next to the patch embeddings for a
    tower trained from scratch to learn where its patches are.) `None` for non-square grids (no such table)."""
    grid_h, grid_w = tower.patch_embed.grid_size
    prefix = tower.pos_embed.shape[1] - grid_h * grid_w
    if grid_h != grid_w or tower.embed_dim % 4:
        return None
    table = get_2d_sincos_pos_embed(tower.embed_dim, grid_h)
    return torch.cat([torch.zeros(prefix, tower.embed_dim), table])[None]


class OmniLMMPreTrainedModel(MistralPreTrainedModel):
    config_class = OmniLMMConfig
    config: OmniLMMConfig
    _no_split_modules = ["MistralDecoderLayer", "EvaBlockPostNorm", "EvaBlock", "Resampler"]
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        """Transformers' defaults, plus the tensors it does not know: resampler, EVA embeddings and `k_bias`.

        `k_bias` is a non-persistent zero buffer that no checkpoint holds: it must be set here, or it keeps the
        uninitialised memory that `from_pretrained` gives it.
        """
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, get_2d_sincos_pos_embed(module.embed_dim, module.grid_size))
            init.normal_(module.proj, std=module.embed_dim**-0.5)
        elif isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            super()._init_weights(module.out_proj)
        elif getattr(module, "k_bias", None) is not None:  # timm's EvaAttention
            init.zeros_(module.k_bias)
            init.zeros_(module.q_bias)
            init.zeros_(module.v_bias)
        elif hasattr(module, "cls_token") and hasattr(module, "pos_embed"):  # timm's Eva
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, std=0.02)
            if module.pos_embed is not None:
                table = eva_pos_embed(module)
                if table is None:
                    init.trunc_normal_(module.pos_embed, std=0.02)
                else:
                    init.copy_(module.pos_embed, table)
        else:
            super()._init_weights(module)


class OmniLMMModel(OmniLMMPreTrainedModel, MistralModel):
    """Mistral's decoder that also owns the vision tower and the resampler (state-dict names as in the release:
    `model.vision_tower.*`, `model.resampler.*`)."""

    def __init__(self, config: OmniLMMConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.resampler = Resampler(
            num_queries=config.num_query,
            embed_dim=config.hidden_size,
            num_heads=config.hidden_size // 128,
            kv_dim=self.vision_tower.embed_dim,
        )
        self.post_init()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(n, 3, H, W)` images of one size → `(n, num_query, hidden_size)` resampled features."""
        tower = self.vision_tower
        weight = tower.patch_embed.proj.weight  # on "meta" when offloaded: accelerate's hook then moves the input
        device = pixel_values.device if weight.device.type == "meta" else weight.device
        pixel_values = pixel_values.to(device=device, dtype=weight.dtype)
        features = tower(pixel_values)[:, tower.num_prefix_tokens :]  # = forward_features, see build_vision_tower
        patch_h, patch_w = tower.patch_embed.patch_size
        grid_hw = (math.ceil(pixel_values.shape[-2] / patch_h), math.ceil(pixel_values.shape[-1] / patch_w))
        return self.resampler(features.to(self.resampler.query.dtype), grid_hw)

    def get_vision_embedding(self, pixel_values) -> torch.Tensor:
        """Images (a `(N, 3, H, W)` tensor or a list per sample of lists of `(3, H, W)` tensors) → `(N, num_query,
        hidden_size)`, in reading order. Images are grouped by size and encoded `config.vision_batch_size` at a
        time: one vision forward per group and chunk, not one per image."""
        images = flatten_images(pixel_values)
        if len(images) == 0:
            return self.resampler.query.new_zeros(0, self.config.num_query, self.config.hidden_size)
        chunk = self.config.vision_batch_size
        if isinstance(images, torch.Tensor):
            return torch.cat([self.encode_images(images[i : i + chunk]) for i in range(0, len(images), chunk)])
        groups = defaultdict(list)
        for index, image in enumerate(images):
            groups[tuple(image.shape)].append(index)
        features = [None] * len(images)
        for indices in groups.values():
            for start in range(0, len(indices), chunk):
                batch = indices[start : start + chunk]
                encoded = self.encode_images(torch.stack([images[i] for i in batch]))
                for i, feature in zip(batch, encoded):
                    features[i] = feature
        return torch.stack(features)

    def count_image_spans(self, input_ids: torch.Tensor) -> int:
        """Check that every image span is `<im_start>`, exactly `num_query` x `<im_patch>`, `<im_end>`, and return
        how many spans `input_ids` holds; a malformed span is a `ValueError` naming the counts."""
        config = self.config
        starts = input_ids == config.im_start_token_id
        num_starts = int(starts.sum())
        num_ends = int((input_ids == config.im_end_token_id).sum())
        num_patches = int((input_ids == config.im_patch_token_id).sum())
        if num_starts != num_ends:
            raise ValueError(f"unmatched image spans: {num_starts} <im_start> but {num_ends} <im_end> tokens")
        if num_patches != num_starts * config.num_query:
            raise ValueError(
                f"{num_starts} image spans need {num_starts * config.num_query} <im_patch> tokens "
                f"({config.num_query} each), but the input has {num_patches}"
            )
        if num_starts:
            rows, cols = starts.nonzero(as_tuple=True)
            offsets = cols[:, None] + torch.arange(1, config.num_query + 2, device=input_ids.device)
            expected = torch.full((config.num_query + 1,), config.im_patch_token_id, device=input_ids.device)
            expected[-1] = config.im_end_token_id
            if int(offsets.max()) >= input_ids.shape[1] or not (input_ids[rows[:, None], offsets] == expected).all():
                raise ValueError(
                    f"every image span must be <im_start>, exactly {config.num_query} <im_patch>, <im_end>; "
                    "the input has a span that is cut or interleaved with other tokens"
                )
        return num_starts

    def check_input_ids(self, input_ids, check_range: bool = True) -> None:
        """`input_ids` must be a `(batch, length)` integer tensor of ids inside the vocabulary."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
            got = getattr(input_ids, "dtype", type(input_ids))
            raise TypeError(f"input_ids must be a torch.long tensor of token ids, got {got}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be a (batch, length) tensor, got shape {tuple(input_ids.shape)}")
        low, high = (int(input_ids.min()), int(input_ids.max())) if check_range and input_ids.numel() else (0, 0)
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(
                f"input_ids holds ids from {low} to {high}, outside the vocabulary of {self.config.vocab_size} "
                "tokens (a tokenizer that does not belong to this model?)"
            )

    def check_images_per_sample(self, input_ids, pixel_values) -> None:
        """With a list per sample, each sample's images must match that sample's spans (not just the total)."""
        nested = isinstance(pixel_values, (list, tuple)) and all(isinstance(s, (list, tuple)) for s in pixel_values)
        if not nested or not pixel_values:
            return
        spans_per_sample = (input_ids == self.config.im_start_token_id).sum(dim=1).tolist()
        images_per_sample = [len(sample) for sample in pixel_values]
        if images_per_sample != spans_per_sample:
            raise ValueError(
                f"the samples have {spans_per_sample} image spans but pixel_values holds {images_per_sample} "
                "images per sample (a list per sample must match that sample's spans)"
            )

    def check_image_features(self, vision_hidden_states, num_spans: int) -> torch.Tensor:
        """Precomputed features (a tensor or a list of tensors) → one `(num_spans, num_query, hidden)` tensor."""
        features = vision_hidden_states
        if isinstance(features, (list, tuple)) and features and all(isinstance(v, torch.Tensor) for v in features):
            features = torch.cat([v.reshape(-1, *v.shape[-2:]) for v in features])
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"vision_hidden_states must be a tensor (or a list of tensors), got {type(vision_hidden_states)}")
        expected_shape = (num_spans, self.config.num_query, self.config.hidden_size)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected_shape[1:]:
            raise ValueError(
                f"image features must have the shape (num_images, {expected_shape[1]}, {expected_shape[2]}), "
                f"got {tuple(features.shape)}"
            )
        if features.shape[0] != num_spans:
            raise ValueError(
                f"the input has {num_spans} image spans but {features.shape[0]} images were given "
                f"(image features of shape {tuple(features.shape)}, expected {expected_shape})"
            )
        return features

    def embed_with_images(self, input_ids, pixel_values=None, vision_hidden_states=None, is_prefill=True):
        """`(B, L)` ids → `(B, L, hidden)` embeddings whose `<im_patch>` rows hold the images' resampled features,
        span `k` (in reading order: sample 0 left to right, then sample 1, ...) taking image `k`."""
        self.check_input_ids(input_ids, check_range=is_prefill)
        inputs_embeds = self.embed_tokens(input_ids)
        if pixel_values is None and vision_hidden_states is None and not is_prefill:
            return inputs_embeds  # decoding step: the image spans are in the cache already
        num_spans = self.count_image_spans(input_ids)
        if pixel_values is not None:
            self.check_images_per_sample(input_ids, pixel_values)
        if vision_hidden_states is None and pixel_values is not None:
            vision_hidden_states = self.get_vision_embedding(pixel_values)
        if vision_hidden_states is None:
            if num_spans:
                raise ValueError(f"the input has {num_spans} image spans but no pixel_values or vision_hidden_states")
            return inputs_embeds
        features = self.check_image_features(vision_hidden_states, num_spans)
        if not num_spans:  # (features of no image may sit on "meta" when the resampler is offloaded)
            return inputs_embeds
        mask = (input_ids == self.config.im_patch_token_id).unsqueeze(-1)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.device, inputs_embeds.dtype))

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        vision_hidden_states=None,
        image_sizes=None,
        slice_grids=None,
        **kwargs,
    ):
        """Mistral's forward, with the images of `pixel_values` (or their precomputed `vision_hidden_states`)
        placed into the image spans of `input_ids`. The cache travels in `**kwargs` (its name changed in v5)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give `input_ids` (or `inputs_embeds` with the image features already in place)")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            is_prefill = cache is None or cache.get_seq_length() == 0
            inputs_embeds = self.embed_with_images(input_ids, pixel_values, vision_hidden_states, is_prefill)
        elif pixel_values is not None or vision_hidden_states is not None:
            raise ValueError("give images with `input_ids`, not with `inputs_embeds` (their spans are found in the ids)")
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )


def chat_content(content) -> tuple[list[dict], list]:
    """A message's content (a string, or a list of images and strings) → chat-template parts and its images."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}], []
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"message content must be a string or a list of images and strings, got {type(content)}")
    parts, images = [], []
    for item in content:
        if isinstance(item, str):
            parts.append({"type": "text", "text": item})
        elif isinstance(item, dict) and item.get("type") == "text":
            if not isinstance(item.get("text"), str):
                raise TypeError(f"a text content part needs a string 'text', got {item!r}")
            parts.append({"type": "text", "text": item["text"]})
        else:
            image = item.get("image", item.get("url", item.get("path"))) if isinstance(item, dict) else item
            if image is None:
                raise TypeError(f"cannot read an image or a text from the content part {item!r}")
            parts.append({"type": "image"})
            images.append(image)
    return parts, images


def chat_conversation(msgs, image=None, system_prompt=None) -> tuple[list[dict], list]:
    """`chat()`'s messages → a chat-template conversation and its images in order; `image` goes in front of the
    first user message, `system_prompt` in front of everything (unless a system message is already there)."""
    if not isinstance(msgs, (list, tuple)) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("msgs must be a non-empty list of {'role': ..., 'content': ...} messages (or a list of such lists)")
    conversation, images = [], []
    msgs = copy.copy(list(msgs))
    if image is not None:
        first_user = next((i for i, m in enumerate(msgs) if m.get("role") == "user"), None)
        if first_user is None:
            raise ValueError("`image` goes in front of the first user message, but msgs has no user message")
        content = msgs[first_user]["content"]
        content = list(content) if isinstance(content, (list, tuple)) else [content]
        # As a typed part: a path given as `image` is an image, not text.
        msgs[first_user] = {**msgs[first_user], "content": [{"type": "image", "image": image}] + content}
    if system_prompt is not None and msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    for message in msgs:
        if message.get("role") not in ("system", "user", "assistant") or "content" not in message:
            raise ValueError(f"each message needs a role (system, user or assistant) and a content, got {message!r}")
        parts, message_images = chat_content(message["content"])
        conversation.append({"role": message["role"], "content": parts})
        images.extend(message_images)
    return conversation, images


def view_key(view: torch.Tensor) -> tuple:
    """A cache key for one preprocessed view: its shape, dtype and a hash of its bytes (read in place, no copy)."""
    data = view.detach().cpu().contiguous().view(torch.uint8).numpy()
    return tuple(view.shape), view.dtype, hashlib.sha1(data).hexdigest()


def image_key(image, max_pixels) -> tuple | None:
    """A cache key for an image given to `chat()`: a PIL image's pixels, or an image file's path, size and mtime.
    `None` (preprocessed every time) for anything else, and for images the processor would refuse or cannot read."""
    try:
        if isinstance(image, Image.Image) and image.width * image.height <= max_pixels:
            return "pixels", image.mode, image.size, hashlib.sha1(image.tobytes()).hexdigest()
        if isinstance(image, (str, os.PathLike)) and os.path.isfile(image):
            stat = os.stat(image)
            return "file", os.path.abspath(image), stat.st_size, stat.st_mtime_ns
    except (OSError, ValueError):  # closed, truncated or corrupt: the processor names the problem
        return None
    return None


class OmniLMMChatMixin:
    """MiniCPM-V's model-card API: `model.chat(image=..., msgs=[{"role": "user", "content": "..."}], tokenizer=...)`."""

    def chat_processor(self, processor=None, tokenizer=None):
        """The given processor, else the one saved in the model's own folder (loaded once)."""
        if processor is None:
            processor = getattr(self, "_chat_processor", None)
            if processor is None:
                source = self.config._name_or_path or getattr(self, "name_or_path", "")
                if not source:
                    raise ValueError("give `processor=`: this model was not loaded from a folder that holds one")
                processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
                self._chat_processor = processor
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
            raise TypeError(
                f"processor must be the model's OmniLMMProcessor (give `processor=` when its folder has none), "
                f"got {type(processor)}"
            )
        if tokenizer is not None and tokenizer is not processor.tokenizer:
            if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
                raise TypeError(f"tokenizer must be the model's tokenizer, got {type(tokenizer)}")
            processor = copy.copy(processor)
            processor.tokenizer = tokenizer
        config = self.config
        ids = processor.tokenizer.convert_tokens_to_ids(["<im_patch>", "<im_start>", "<im_end>"])
        expected = [config.im_patch_token_id, config.im_start_token_id, config.im_end_token_id]
        num_query = getattr(processor, "num_query", config.num_query)
        if ids != expected or num_query != config.num_query:
            raise ValueError(
                f"the processor does not fit this model: its image spans are {num_query} x <im_patch> and its "
                f"<im_patch>, <im_start>, <im_end> ids are {ids}; the model needs {config.num_query} x and {expected}"
            )
        return processor

    def clear_chat_cache(self) -> None:
        """Forget the images `chat()` has seen (their slice grids and features)."""
        for name in ("_vision_cache", "_vision_cache_last", "_layout_cache"):
            self.__dict__.pop(name, None)

    def cached_vision_embedding(self, pixel_values, keys=None) -> torch.Tensor:
        """`get_vision_embedding`, reusing the features of views (images or tiles) already seen, keyed by their
        pixels (`keys`: their `view_key`s, when already computed)."""
        views = flatten_images(pixel_values)
        keys = keys or [view_key(view) for view in views]
        cache = self.__dict__.setdefault("_vision_cache", OrderedDict())
        new = [i for i, key in enumerate(keys) if key not in cache]
        if new:
            for i, feature in zip(new, self.get_vision_embedding([[views[i] for i in new]])):
                cache[keys[i]] = feature
        return self.cached_views(keys)

    def cached_views(self, keys) -> torch.Tensor:
        """The cached features `(len(keys), num_query, hidden_size)` of the views with these keys (all cached)."""
        cache = self.__dict__["_vision_cache"]
        for key in keys:
            cache.move_to_end(key)
        last = self.__dict__.get("_vision_cache_last")
        if last is not None and last[0] == keys:
            stacked = last[1]  # the same views as the previous turn: not even a copy
        else:
            stacked = torch.stack([cache[key] for key in keys])
            self.__dict__["_vision_cache_last"] = (keys, stacked)
        while len(cache) > VISION_CACHE_SIZE:
            cache.popitem(last=False)
        return stacked

    def chat_inputs(self, processor, prompts, sample_images, max_slice_nums, vision_hidden_states=None):
        """Token ids and image features for `chat()`'s rendered `prompts`.

        An image seen in an earlier turn (same pixels or same unchanged file, same processor settings) is neither
        preprocessed nor encoded again: its `<image>` expands from its remembered slice grid, its features come from
        the cache. Given `vision_hidden_states` are used as they are (no cache). Returns `(inputs,
        vision_hidden_states)`; the features are `None` for text-only prompts."""
        settings = (max_slice_nums, processor.image_processor.to_json_string())
        max_pixels = getattr(processor.image_processor, "max_image_pixels", None) or float("inf")
        keys = [[image_key(image, max_pixels) for image in images] for images in sample_images]
        layouts = self.__dict__.setdefault("_layout_cache", OrderedDict())
        known = [[layouts.get((key, settings)) if key else None for key in sample] for sample in keys]
        cache = self.__dict__.get("_vision_cache", {})
        if (
            vision_hidden_states is None
            and any(sample_images)
            and all(layout is not None for sample in known for layout in sample)
            and all(view in cache for sample in known for _, views in sample for view in views)
            and all(prompt.count(processor.image_token) == len(sample) for prompt, sample in zip(prompts, known))
        ):
            texts = []
            for prompt, sample in zip(prompts, known):
                pieces = prompt.split(processor.image_token)
                placeholders = [processor.image_placeholder(grid) for grid, _ in sample] + [""]
                texts.append("".join(piece + placeholder for piece, placeholder in zip(pieces, placeholders)))
            inputs = processor.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
            return inputs, self.cached_views([view for sample in known for _, views in sample for view in views])
        inputs = processor(
            text=prompts,
            images=sample_images if any(sample_images) else None,
            max_slice_nums=max_slice_nums,
            return_tensors="pt",
        ).to(self.device)
        if vision_hidden_states is not None or inputs.get("pixel_values") is None:
            return inputs, vision_hidden_states
        view_keys = [[view_key(view) for view in views] for views in inputs["pixel_values"]]
        features = self.cached_vision_embedding(inputs["pixel_values"], [k for sample in view_keys for k in sample])
        for sample_keys, grids, sample_view_keys in zip(keys, inputs["slice_grids"], view_keys):
            start = 0
            for key, grid in zip(sample_keys, grids):
                count = 1 + (grid[0] * grid[1] if grid is not None else 0)
                if key is not None:
                    layouts[(key, settings)] = (grid, sample_view_keys[start : start + count])
                    layouts.move_to_end((key, settings))
                start += count
        while len(layouts) > VISION_CACHE_SIZE:
            layouts.popitem(last=False)
        return inputs, features

    @torch.no_grad()
    def chat(
        self,
        image=None,
        msgs=None,
        tokenizer=None,
        processor=None,
        vision_hidden_states=None,
        max_new_tokens=1024,
        sampling=True,
        system_prompt=None,
        stream=False,
        max_slice_nums=None,
        **generate_kwargs,
    ):
        """Answer the last user message of `msgs` (or of each conversation, when `msgs` is a list of them).

        Content is a string or a list of PIL images (or paths) and strings; a list of many images is a video
        (more than 16 frames: one unsliced view per frame). `sampling=True` uses `generation_config.json`'s
        sampling settings, `sampling=False` greedy decoding; every other keyword goes to `generate`.
        Returns the answer text, a list of them for a batch, or with `stream=True` a generator of text pieces.
        """
        batched = isinstance(msgs, (list, tuple)) and len(msgs) > 0 and isinstance(msgs[0], (list, tuple))
        conversations = list(msgs) if batched else [msgs]
        images = image if batched and image is not None else [image] * len(conversations)
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"with a batch of conversations, `image` must be a list (an image or None each), got {type(image)}")
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} entries in `image`")
        if stream and batched:
            raise ValueError("stream=True answers one conversation at a time; give a single msgs list")
        processor = self.chat_processor(processor, tokenizer)
        prompts, sample_images = [], []
        for conversation, first_image in zip(conversations, images):
            template_conversation, conversation_images = chat_conversation(conversation, first_image, system_prompt)
            prompts.append(processor.apply_chat_template(template_conversation, add_generation_prompt=True, tokenize=False))
            sample_images.append(conversation_images)
        if max(len(i) for i in sample_images) > MAX_FRAMES_WITH_SLICES:
            max_slice_nums = 1
        inputs, vision_hidden_states = self.chat_inputs(
            processor, prompts, sample_images, max_slice_nums, vision_hidden_states
        )
        generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": bool(sampling), **generate_kwargs}
        generate_kwargs.update(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], vision_hidden_states=vision_hidden_states
        )
        if stream:
            streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            threading.Thread(target=self.generate, kwargs={**generate_kwargs, "streamer": streamer}, daemon=True).start()
            return (piece for piece in streamer if piece)
        output = self.generate(**generate_kwargs)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = [answer.strip() for answer in answers]
        return answers if batched else answers[0]


def lm_head_logits(lm_head: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """`lm_head(hidden_states)`: `(..., hidden_size)` → `(..., vocab_size)` logits.

    Decoding a batch on the CPU (2-64 rows, no gradients) multiplies by the weight in blocks of `LM_HEAD_BLOCK`
    vocabulary rows: MKL's GEMM for a few rows against the whole 32k x hidden weight runs 1.3-1.9x slower than on
    cache-sized blocks (`omnilmm-bench`, comparison 5). Anything else (GPU, training, offloaded or wrapped heads) is
    a plain call."""
    rows = hidden_states.numel() // hidden_states.shape[-1]
    plain = (
        type(lm_head) is not nn.Linear
        or lm_head.weight.device.type != "cpu"
        or hidden_states.device.type != "cpu"
        or torch.is_grad_enabled()
        or not 2 <= rows <= 64
        or hasattr(lm_head, "_hf_hook")
    )
    if plain:
        return lm_head(hidden_states)
    blocks = lm_head.weight.split(LM_HEAD_BLOCK)
    biases = lm_head.bias.split(LM_HEAD_BLOCK) if lm_head.bias is not None else [None] * len(blocks)
    return torch.cat([nn.functional.linear(hidden_states, w, b) for w, b in zip(blocks, biases)], dim=-1)


class OmniLMMForCausalLM(OmniLMMChatMixin, OmniLMMPreTrainedModel, MistralForCausalLM):
    """OmniLMM with its language-model head: `forward`, `generate` and `chat`."""

    def __init__(self, config: OmniLMMConfig):
        OmniLMMPreTrainedModel.__init__(self, config)  # not MistralForCausalLM's: it would build a MistralModel
        self.model = OmniLMMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_vision_embedding(self, pixel_values) -> torch.Tensor:
        """Images → `(N, num_query, hidden_size)` features, see `OmniLMMModel.get_vision_embedding`."""
        return self.model.get_vision_embedding(pixel_values)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        vision_hidden_states=None,
        logits_to_keep=0,
        image_sizes=None,
        slice_grids=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits `(B, L, vocab)` and, with `labels` (`-100` = ignored), the shifted causal-LM loss.

        `image_sizes` and `slice_grids` (processor outputs that describe the images) are accepted and not needed:
        the image spans of `input_ids` already say where every image and tile goes."""
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            vision_hidden_states=vision_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = lm_head_logits(self.lm_head, hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_FIELD: outputs.get(CACHE_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def prepare_inputs_for_generation(self, *args, vision_hidden_states=None, is_first_iteration=False, **kwargs):
        """Generation's inputs; image features go in at prefill only (pixel_values are dropped by transformers)."""
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if is_first_iteration or not kwargs.get("use_cache", True):
            model_inputs["vision_hidden_states"] = vision_hidden_states
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search / several sequences repeat each *sample*; repeat its images with it (a sample may hold any
        number of images, so transformers' per-row `repeat_interleave` cannot do it)."""
        images = {k: model_kwargs.pop(k) for k in ("pixel_values", "vision_hidden_states") if model_kwargs.get(k) is not None}
        if expand_size > 1 and images:
            spans_per_sample = (input_ids == self.config.im_start_token_id).sum(dim=1).tolist()
            ends = torch.tensor(spans_per_sample).cumsum(0).tolist()
            order = [i for s, end in enumerate(ends) for _ in range(expand_size) for i in range(end - spans_per_sample[s], end)]
            for key, value in images.items():
                value = flatten_images(value) if key == "pixel_values" else value
                images[key] = value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **images}


__all__ = ["OmniLMMPreTrainedModel", "OmniLMMModel", "OmniLMMForCausalLM"]
