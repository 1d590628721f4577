# Copyright 2026 The omnilmm-hf authors. Licensed under the Apache License, Version 2.0.
"""OmniLMM: an EVA02 vision tower (timm), a Perceiver resampler and a Mistral decoder.

Every image (or slice) becomes `num_query` tokens that replace the `<im_patch>` tokens of one image span
(`<im_start>`, `num_query` x `<im_patch>`, `<im_end>`) of the prompt; the rest is Mistral.
"""

import copy
import ctypes
import hashlib
import inspect
import json
import math
import os
import sys
import threading
from collections import OrderedDict, defaultdict
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, MistralForCausalLM, MistralModel, TextIteratorStreamer
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.models.mistral.modeling_mistral import MistralPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .configuration_omnilmm import OmniLMMConfig
from .image_processing_omnilmm import VIDEO_SUFFIXES, num_views
from .resampler import Resampler, get_2d_sincos_pos_embed

MAX_FRAMES_WITH_SLICES = 16  # chat(): more images than this in one conversation are encoded unsliced (video)
VISUALS = ("image", "video")  # chat(): the kinds of content parts that take spans
VIDEO_SAMPLING = ("fps", "num_frames", "max_num_frames")  # chat(): keywords for the video processor, not `generate`
CHAT_CACHE_SIZE = 64  # chat(): the features of this many recent views (images, tiles) are kept for later turns
# transformers 5.24 renamed the cache argument and output field (`past_key_values` before).
CACHE_ARG = "cache" if "cache" in inspect.signature(MistralModel.forward).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def build_vision_tower(config: OmniLMMConfig) -> nn.Module:
    """The timm EVA02 tower (weights from the checkpoint) without its last block: its output is the second-to-last
    layer's."""
    # On the meta device (`from_pretrained` builds the model empty, then loads or initialises every tensor) timm's
    # own random init would be thrown away, and on meta tensors it costs more than building the tower: skip it there.
    on_meta = torch.empty(0).device.type == "meta"
    with patch.object(timm.models.eva.Eva, "init_weights", lambda *args, **kwargs: None) if on_meta else nullcontext():
        tower = timm.create_model(
            config.mm_vision_tower, pretrained=False, num_classes=0, dynamic_img_size=True, dynamic_img_pad=True,
            **config.vision_tower_kwargs,
        )
    del tower.blocks[-1]
    # accelerate's CPU/disk offload loads a module's weights only when the module is *called*: call the tower
    # itself (pooling off, it returns every token) and let EVA's attention call its `qkv` layer.
    tower.global_pool = ""
    for module in tower.modules():
        if hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
    return tower


def flatten_images(images) -> list[torch.Tensor] | torch.Tensor:
    """An `(N, 3, H, W)` tensor, or (nested) lists of `(3, H, W)` tensors → the tensor, or a flat list, in order."""
    if not isinstance(images, (list, tuple)):
        check_image_tensor(images, 4, "pixel_values must be a (num_images, 3, height, width) tensor")
        return images
    flat = [x for item in images for x in (flatten_images(item) if isinstance(item, (list, tuple)) else [item])]
    for image in flat:
        check_image_tensor(image, 3, "each image in pixel_values must be a (3, height, width) tensor")
    return flat


def check_image_tensor(image, ndim: int, shape_message: str) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            "pixel_values must be a tensor or a list per sample of lists, and lists must hold (3, height, width) "
            f"tensors; got {type(image)}"
        )
    if image.ndim != ndim or image.shape[-3] != 3:
        raise ValueError(f"{shape_message}, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"pixel_values must be normalised float images (use the processor), got {image.dtype}")


class OmniLMMPreTrainedModel(MistralPreTrainedModel):
    config: OmniLMMConfig  # (also its `config_class`)
    input_modalities = ["image", "text"]
    _no_split_modules = ["MistralDecoderLayer", "EvaBlockPostNorm", "EvaBlock", "Resampler"]
    _can_compile_fullgraph = True
    _supports_attention_backend = True

    def get_vision_embedding(self, pixel_values) -> torch.Tensor:
        """The original's name for `get_image_features(pixel_values).pooler_output`."""
        return self.get_image_features(pixel_values).pooler_output

    def _init_weights(self, module):
        """Transformers' defaults, plus the tensors it does not know: resampler, EVA embeddings and `k_bias`
        (a non-persistent zero buffer no checkpoint holds: unset, it keeps `from_pretrained`'s empty memory)."""
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.copy_(module.pos_embed, get_2d_sincos_pos_embed(module.embed_dim, module.grid_size))
            init.normal_(module.proj, std=module.embed_dim**-0.5)
        elif isinstance(module, nn.MultiheadAttention):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)
            super()._init_weights(module.out_proj)
        elif getattr(module, "k_bias", None) is not None:  # timm's EvaAttention
            for bias in (module.q_bias, module.k_bias, module.v_bias):
                init.zeros_(bias)
        elif hasattr(module, "cls_token") and hasattr(module, "pos_embed"):  # timm's Eva
            for tensor in (module.cls_token, module.pos_embed):
                if tensor is not None:
                    init.trunc_normal_(tensor, std=0.02)
        else:
            super()._init_weights(module)


def check_input_ids(input_ids, vocab_size: int) -> None:
    """`input_ids` must be a `(batch, length)` integer tensor of ids inside the vocabulary."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
        got = getattr(input_ids, "dtype", type(input_ids))
        raise TypeError(f"input_ids must be a torch.long tensor of token ids, got {got}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    low, high = (int(input_ids.min()), int(input_ids.max())) if input_ids.numel() else (0, 0)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids holds ids from {low} to {high}, outside the vocabulary of {vocab_size} tokens "
            "(a tokenizer that does not belong to this model?)"
        )


def count_image_spans(input_ids: torch.Tensor, config: OmniLMMConfig) -> int:
    """The number of image spans in `input_ids`; each must be `<im_start>`, `num_query` x `<im_patch>`, `<im_end>`."""
    starts = input_ids == config.im_start_token_id
    num_starts, num_ends = int(starts.sum()), int((input_ids == config.im_end_token_id).sum())
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


def check_images_per_sample(input_ids, pixel_values, config) -> None:
    """Given a list per sample, each sample's images must match that sample's spans (not just the total)."""
    per_sample = isinstance(pixel_values, (list, tuple)) and all(isinstance(x, (list, tuple)) for x in pixel_values)
    if input_ids is None or not per_sample or not pixel_values:
        return
    spans = (input_ids == config.im_start_token_id).sum(dim=1).tolist()
    images = [len(flatten_images(sample)) for sample in pixel_values]
    if images != spans:
        raise ValueError(
            f"the samples have {spans} image spans but pixel_values holds {images} images per sample "
            "(a list per sample must match that sample's spans)"
        )


class OmniLMMModel(OmniLMMPreTrainedModel, MistralModel):
    """Mistral's decoder that also owns the vision tower and the resampler (state-dict names as in the release:
    `model.vision_tower.*`, `model.resampler.*`)."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # loaded from a full checkpoint by AutoModel

    def __init__(self, config: OmniLMMConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config)
        self.resampler = Resampler(
            num_queries=config.num_query, embed_dim=config.hidden_size, num_heads=config.hidden_size // 128,
            kv_dim=self.vision_tower.embed_dim,
        )
        self.post_init()

    def vision_outputs(self, pixel_values, output_hidden_states=False, output_attentions=False) -> BaseModelOutput:
        """The vision tower on `(n, 3, H, W)` images of one size: `last_hidden_state` `(n, 1 + h * w, embed_dim)` (the
        class token first) and, if asked, `hidden_states` (the first block's input, then every block's output) and
        `attentions` (every block's `(n, heads, L, L)` probabilities, computed unfused for this call)."""
        tower, captured, hooks, fused = self.vision_tower, {"hidden_states": [], "attentions": []}, [], []
        # (Parameters are read through `parameters()`: reading an attribute gathers a ZeRO-3 partition, on this
        # process alone.) On "meta" when offloaded: accelerate's hook then moves the input.
        weight = next(tower.patch_embed.parameters())
        device = pixel_values.device if weight.device.type == "meta" else weight.device
        pixel_values = pixel_values.to(device=device, dtype=weight.dtype)
        if output_hidden_states:
            keep = captured["hidden_states"].append
            hooks = [tower.blocks[0].register_forward_pre_hook(lambda _, args: keep(args[0])),
                     *(block.register_forward_hook(lambda *io: keep(io[2])) for block in tower.blocks)]
        for block in tower.blocks if output_attentions else ():  # the probabilities go through `attn_drop`
            fused.append((block.attn, block.attn.fused_attn))
            block.attn.fused_attn = False
            hooks.append(block.attn.attn_drop.register_forward_hook(lambda *io: captured["attentions"].append(io[2])))
        try:
            last = tower(pixel_values)  # = forward_features, see build_vision_tower
        finally:
            for hook in hooks:
                hook.remove()
            for attention, was_fused in fused:
                attention.fused_attn = was_fused
        return BaseModelOutput(last_hidden_state=last, **{k: tuple(v) or None for k, v in captured.items()})

    def encode_images(self, pixel_values: torch.Tensor, vision_outputs=None) -> torch.Tensor:
        """`(n, 3, H, W)` images of one size → `(n, num_query, hidden_size)` resampled features (from their
        `vision_outputs`, when already computed)."""
        tower = self.vision_tower
        vision_outputs = vision_outputs or self.vision_outputs(pixel_values)
        features = vision_outputs.last_hidden_state[:, tower.num_prefix_tokens :]
        patch_h, patch_w = tower.patch_embed.patch_size
        grid_hw = (math.ceil(pixel_values.shape[-2] / patch_h), math.ceil(pixel_values.shape[-1] / patch_w))
        return self.resampler(features.to(next(self.resampler.parameters()).dtype), grid_hw)

    @can_return_tuple
    def get_image_features(self, pixel_values, output_hidden_states=False, output_attentions=False,
                           **kwargs) -> BaseModelOutputWithPooling:
        """Images (a `(N, 3, H, W)` tensor or lists per sample of `(3, H, W)` tensors) → `pooler_output`: `(N,
        num_query, hidden_size)` features in reading order, `config.vision_batch_size` images of a size at a time;
        with `output_hidden_states` / `output_attentions`, the vision tower's `last_hidden_state`, `hidden_states`
        and `attentions` too (see `vision_outputs`), stacked over the images (lists of them when sizes differ)."""
        images = flatten_images(pixel_values)
        if len(images) == 0:
            empty = next(self.resampler.parameters()).new_zeros(0, self.config.num_query, self.config.hidden_size)
            return BaseModelOutputWithPooling(pooler_output=empty)
        groups, chunk = defaultdict(list), self.config.vision_batch_size
        for index, image in enumerate(images):
            groups[tuple(image.shape)].append(index)
        features, states = [None] * len(images), [None] * len(images)
        for indices in groups.values():
            for start in range(0, len(indices), chunk):
                batch = indices[start : start + chunk]
                pixels = torch.stack([images[i] for i in batch])
                outputs = self.vision_outputs(pixels, output_hidden_states, output_attentions)
                for row, (i, feature) in enumerate(zip(batch, self.encode_images(pixels, outputs))):
                    features[i] = feature
                    parts = (outputs.last_hidden_state, outputs.hidden_states, outputs.attentions)
                    states[i] = [x[row] if torch.is_tensor(x) else x and tuple(y[row] for y in x) for x in parts]
        output = BaseModelOutputWithPooling(pooler_output=torch.stack(features))
        if output_hidden_states or output_attentions:
            join = torch.stack if len(groups) == 1 else list
            last, hidden, attentions = zip(*states)
            output["last_hidden_state"] = join(last)
            for key, per_view in (("hidden_states", hidden), ("attentions", attentions)):
                if per_view[0] is not None:
                    output[key] = tuple(join(layer) for layer in zip(*per_view))
        return output

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features) -> torch.Tensor:
        """`(B, L, 1)` mask of the `<im_patch>` positions (from the ids, or from the embedding of `<im_patch>` when
        only `inputs_embeds` are given); one span per image, in reading order, or a `ValueError`."""
        config = self.config
        if input_ids is None:
            patch = self.get_input_embeddings()(torch.tensor(config.im_patch_token_id, device=inputs_embeds.device))
            mask = (inputs_embeds == patch).all(-1)
        else:
            mask = input_ids == config.im_patch_token_id
        if not torch.compiler.is_compiling():
            spans = int(mask.sum()) // config.num_query if input_ids is None else count_image_spans(input_ids, config)
            if image_features.ndim != 3 or tuple(image_features.shape[1:]) != (config.num_query, config.hidden_size):
                raise ValueError(
                    f"image features must have the shape (num_images, {config.num_query}, {config.hidden_size}), "
                    f"got {tuple(image_features.shape)}"
                )
            if image_features.shape[0] != spans:
                raise ValueError(
                    f"the input has {spans} image spans but {image_features.shape[0]} images were given "
                    f"(image features of shape {tuple(image_features.shape)})"
                )
        return mask.unsqueeze(-1).to(inputs_embeds.device)

    def image_features(self, input_ids, pixel_values, mm_encoder_outputs, vision_hidden_states):
        """The features to place: encoded by `generate` (`mm_encoder_outputs`), precomputed (`vision_hidden_states`,
        `chat()`'s alias) or from `pixel_values`; `None` when no image is given."""
        if mm_encoder_outputs is not None and mm_encoder_outputs.get("image") is not None:
            return mm_encoder_outputs["image"].pooler_output
        if vision_hidden_states is not None:
            features = vision_hidden_states
            if isinstance(features, (list, tuple)) and features and all(isinstance(v, torch.Tensor) for v in features):
                features = torch.cat([v.reshape(-1, *v.shape[-2:]) for v in features])
            if not isinstance(features, torch.Tensor):
                raise TypeError(f"vision_hidden_states must be a tensor (or a list of tensors), got {type(features)}")
            return features
        if pixel_values is None:
            return None
        check_images_per_sample(input_ids, pixel_values, self.config)
        return self.get_image_features(pixel_values).pooler_output

    @can_return_tuple
    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
        inputs_embeds=None, use_cache=None, mm_encoder_outputs=None, vision_hidden_states=None, image_sizes=None,
        slice_grids=None, past_key_values=None, **kwargs,
    ):
        """Mistral's forward, with the images (`pixel_values`, or their features) placed into the image spans.
        `image_sizes` and `slice_grids` (processor outputs) are not needed: the spans say where each view goes.
        `past_key_values` is the cache's name before transformers 5.24."""
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError(f"two caches were given (`cache` and `past_key_values`): this transformers calls it "
                             f"`{CACHE_ARG}`, give the cache under that name only")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give `input_ids` or `inputs_embeds` (exactly one of them)")
        compiling = torch.compiler.is_compiling()
        # A decoding step continues a prompt whose image spans are in the cache already: no checks, no images.
        decoding = cache is not None and not compiling and cache.get_seq_length() > 0
        encoded = (mm_encoder_outputs or {}).get("image")
        images_given = any(x is not None for x in (pixel_values, encoded, vision_hidden_states))
        if decoding and images_given and input_ids is not None:  # unless it continues with new image spans
            decoding = not (input_ids == self.config.im_start_token_id).any()
        if inputs_embeds is None:
            if not compiling and not decoding:
                check_input_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        features = None
        if not decoding:
            features = self.image_features(input_ids, pixel_values, mm_encoder_outputs, vision_hidden_states)
        if features is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, features)
            if features.shape[0]:  # (features of no image may sit on "meta" when the resampler is offloaded)
                features = features.to(inputs_embeds.device, inputs_embeds.dtype)
                inputs_embeds = inputs_embeds.masked_scatter(mask, features)
        elif input_ids is not None and not compiling and not decoding:
            num_spans = count_image_spans(input_ids, self.config)
            if num_spans:
                raise ValueError(f"the input has {num_spans} image spans but no pixel_values or vision_hidden_states")
        if self.training and torch.is_grad_enabled() and (features is None or not features.shape[0]):
            # Text only: the vision side still runs (on one patch, weight 0), so that every process gathers its
            # sharded parameters in step (FSDP, ZeRO-3) and DDP sees them used, as MiniCPM-V does.
            dummy = self.encode_images(inputs_embeds.new_zeros(1, 3, *self.vision_tower.patch_embed.patch_size))
            inputs_embeds = inputs_embeds + 0 * dummy.sum().to(inputs_embeds.dtype)
        return super().forward(
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs,
        )


class OmniLMMForCausalLM(OmniLMMPreTrainedModel, MistralForCausalLM):
    """OmniLMM with its language-model head: `forward`, `generate` and the model-card `chat`."""

    def __init__(self, config: OmniLMMConfig):
        OmniLMMPreTrainedModel.__init__(self, config)  # not MistralForCausalLM's: it would build a MistralModel
        self.model = OmniLMMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`, and also the folders `omnilmm-quantize` writes (`quanto_weights` in
        their config): optimum-quanto int8/int4 weights read straight into quantized layers, which transformers'
        own quanto support cannot do (it quantizes full-precision weights at every load)."""
        if config is None:
            hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub)
        if getattr(config, "quanto_weights", None) is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        return load_quanto_folder(cls, pretrained_model_name_or_path, config, **kwargs)

    def get_image_features(self, pixel_values, **kwargs):
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
        inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, mm_encoder_outputs=None,
        vision_hidden_states=None, image_sizes=None, slice_grids=None, past_key_values=None, **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits `(B, L, vocab)` and, with `labels` (`-100` = ignored), the shifted causal-LM loss."""
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs, vision_hidden_states=vision_hidden_states, **kwargs,
        )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, kept])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{CACHE_FIELD: outputs.get(CACHE_FIELD)},
        )

    def generate(self, inputs=None, *args, **kwargs):
        """`GenerationMixin.generate`, after checking each sample's images against its spans (generation encodes
        `pixel_values` before the first forward, where the samples can no longer be told apart)."""
        check_images_per_sample(kwargs.get("input_ids", inputs), kwargs.get("pixel_values"), self.config)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, is_first_iteration=False, **kwargs):
        """Generation's own inputs, with one change: the images also go to a model's first forward on an empty
        cache when generation calls it "not the first iteration" (the assistant model of assisted decoding)."""
        cache = kwargs.get(CACHE_ARG)
        is_first_iteration = is_first_iteration or cache is None or cache.get_seq_length() == 0
        return super().prepare_inputs_for_generation(
            input_ids, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beam search / several sequences per prompt repeat each *sample* with all its images (transformers >= 5.24
        does it for `pixel_values`, not for `vision_hidden_states`; older versions repeat rows, not samples)."""
        names = ("pixel_values", "vision_hidden_states")
        images = {k: model_kwargs.pop(k) for k in names if model_kwargs.get(k) is not None}
        if expand_size > 1 and images:
            spans = (input_ids == self.config.im_start_token_id).sum(dim=1).tolist()
            ends = np.cumsum(spans).tolist()
            order = [i for s, end in enumerate(ends) for _ in range(expand_size) for i in range(end - spans[s], end)]
            for key, value in images.items():
                value = flatten_images(value) if key == "pixel_values" else value
                images[key] = value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order]
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **images}

    def chat_processor(self, processor=None, tokenizer=None):
        """The given processor, else the one saved in the model's own folder (loaded once)."""
        processor = self.__dict__.get("_chat_processor") if processor is None else processor
        if processor is None:
            source = self.config._name_or_path or getattr(self, "name_or_path", "")
            if not source:
                raise ValueError("give `processor=`: this model was not loaded from a folder that holds one")
            try:
                processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
            except (OSError, ValueError, KeyError) as error:
                raise ValueError(
                    f"{source} holds no OmniLMM processor ({error}): save the processor too "
                    "(`processor.save_pretrained(folder)`), or pass `processor=`"
                ) from error
            self.__dict__["_chat_processor"] = processor
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
            raise TypeError(f"processor must be the model's OmniLMMProcessor (`processor=`), got {type(processor)}")
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
        self.__dict__.pop("_chat_cache", None)

    @torch.no_grad()
    def vision_state(self) -> int:
        """A key for everything image features depend on besides the pixels: each vision module (identity, flags,
        hooks) and tensor (identity, storage, version, dtype, a sample of its values: writes through `.data`)."""
        state, samples = [], []
        for module in (*self.model.vision_tower.modules(), *self.model.resampler.modules()):
            flags = tuple((k, v) for k, v in vars(module).items() if isinstance(v, (bool, int, float, str)))
            state.append((id(module), flags, len(module._forward_hooks), len(module._forward_pre_hooks)))
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                state.append((id(t), t.data_ptr(), t._version, t.dtype, t.device))
                if t.device.type != "meta" and t.numel():
                    samples.append(t.reshape(-1)[:: max(1, t.numel() // 64)].float().sum().to("cpu"))
        return hash((tuple(state), tuple(torch.stack(samples).tolist()) if samples else ()))

    def chat_inputs(self, processor, prompts, sample_visuals, max_slice_nums, features=None, video_kwargs=None):
        """Token ids and image features for `chat()`'s rendered `prompts`; `sample_visuals`: per prompt, its
        `("image" | "video", item)` in reading order. An image or video seen in an earlier turn (same pixels or
        unchanged file, same processor settings, unchanged vision weights; a video also sampled to the same frames in
        the room this prompt leaves) is neither preprocessed nor encoded again: its placeholder expands from its cached
        slice grid(s), its features come from the cache."""
        device = self.get_input_embeddings().weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        slicing = {} if max_slice_nums is None else {"max_slice_nums": max_slice_nums}
        video_kwargs = {**(video_kwargs or {}), **slicing}
        images, videos = ([[x for k, x in visuals if k == kind] for visuals in sample_visuals] for kind in VISUALS)
        call = {"text": prompts, "images": images if any(images) else None, "videos": videos if any(videos) else None,
                "return_tensors": "pt", **video_kwargs}
        if not any(sample_visuals) or features is not None:  # nothing to look up
            return processor(**call).to(device), features
        cache = self.__dict__.setdefault("_chat_cache", OrderedDict())
        settings = (tuple(sorted(video_kwargs.items())), processor.image_processor.to_json_string(),
                    processor.video_processor.to_json_string(), self.vision_state())
        limit = getattr(processor.image_processor, "max_image_pixels", None) or float("inf")
        keys = [[visual_key(kind, x, limit, settings) for kind, x in visuals] for visuals in sample_visuals]
        known = [[cache.get(key) if key else None for key in sample] for sample in keys]
        if all(entry is not None for sample in known for entry in sample) and all(
            still_sampled_alike(processor, prompt, entries, video_kwargs) for prompt, entries in zip(prompts, known)
        ):
            grids = [[entry[0] for entry in sample] for sample in known]
            inputs = processor.expand_and_tokenize(prompts, grids, return_tensors="pt").to(device)
            return inputs, torch.cat([entry[1] for sample in known for entry in sample])
        inputs = processor(**call, return_metadata=bool(any(videos))).to(device)
        features = self.get_vision_embedding(inputs["pixel_values"])
        metadata, entries = iter(inputs.get("video_metadata", [])), []
        for visuals, grids in zip(sample_visuals, inputs["slice_grids"]):
            grids = iter(grids)  # per image one grid, per video one per frame
            for kind, _ in visuals:
                meta = next(metadata) if kind == "video" else None
                own = [next(grids) for _ in meta.frames_indices] if meta else next(grids)
                entries.append((own, sum(map(num_views, own)) if meta else num_views(own), meta))
        views = features.split([count for _, count, _ in entries])
        for key, (grid, _, meta), own_views in zip([key for sample in keys for key in sample], entries, views):
            if key is not None:
                cache[key] = (grid, own_views, meta)
                cache.move_to_end(key)
        while len(cache) > CHAT_CACHE_SIZE:
            cache.popitem(last=False)
        return inputs, features

    @torch.no_grad()
    def chat(
        self, image=None, msgs=None, tokenizer=None, processor=None, vision_hidden_states=None, max_new_tokens=1024,
        sampling=True, system_prompt=None, stream=False, max_slice_nums=None, **generate_kwargs,
    ):
        """Answer the last user message of `msgs` (or of each conversation, when `msgs` is a list of them).

        Content is a string (text) or a list of parts: strings are text; PIL images, `pathlib.Path`s, arrays and
        typed parts (`{"type": "image", "image": ...}`, `{"type": "image_url", ...}`) are images; `{"type": "video",
        "video": file or frames}` (also `"url"`, `"path"`, `{"type": "video_url", ...}`), a `Path` to a video file and
        a 4-D array are videos, sampled by the processor's video processor (`fps`, `num_frames`, `max_num_frames`:
        keywords of this call). More than 16 images are read as frames (one unsliced view each). `sampling=True` uses
        `generation_config.json`'s sampling settings, `sampling=False` greedy decoding; every other keyword goes to
        `generate`. Returns the answer (a list of `num_return_sequences` answers when more than one), a list of
        those for a batch, or with `stream=True` a generator of text pieces."""
        batched = isinstance(msgs, (list, tuple)) and len(msgs) > 0 and isinstance(msgs[0], (list, tuple))
        conversations = list(msgs) if batched else [msgs]
        images = image if batched and image is not None else [image] * len(conversations)
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"with a batch of conversations, `image` must be a list (an image or None each): {image}")
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} entries in `image`")
        if stream and batched:
            raise ValueError("stream=True answers one conversation at a time; give a single msgs list")
        processor = self.chat_processor(processor, tokenizer)
        rendered = [chat_conversation(c, i, system_prompt) for c, i in zip(conversations, images)]
        prompts = processor.apply_chat_template([t for t, _ in rendered], add_generation_prompt=True, tokenize=False)
        sample_visuals = [visuals for _, visuals in rendered]
        if max(sum(kind == "image" for kind, _ in visuals) for visuals in sample_visuals) > MAX_FRAMES_WITH_SLICES:
            max_slice_nums = 1
        video_kwargs = {key: generate_kwargs.pop(key) for key in VIDEO_SAMPLING if key in generate_kwargs}
        inputs, features = self.chat_inputs(processor, prompts, sample_visuals, max_slice_nums, vision_hidden_states,
                                            video_kwargs)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": bool(sampling), **generate_kwargs}
        kwargs.update(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        if features is not None:
            kwargs["vision_hidden_states"] = features
        if stream:
            return stream_answer(self, processor.tokenizer, kwargs)
        output = self.generate(**kwargs)
        answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers = [answer.strip() for answer in answers]
        per_prompt = len(answers) // len(prompts)
        if per_prompt > 1:
            answers = [answers[i : i + per_prompt] for i in range(0, len(answers), per_prompt)]
        return answers if batched else answers[0]


# glibc's `malloc_trim`: hands freed heap memory back to the system (loading a quantized folder frees buffers of
# many sizes, which glibc would keep: the process would hold 1.5x the weights instead of 1x)
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform == "linux" else None


class SafetensorsReader:
    """A safetensors file read one tensor at a time with plain reads into memory of the tensor's own, its pages
    then dropped from the page cache: no mapping of the file stays behind the tensors a model keeps, and reading
    costs one tensor more than what is kept."""

    DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path):
        self.file = open(path, "rb")
        size = int.from_bytes(self.file.read(8), "little")
        self.header = json.loads(self.file.read(size))
        self.header.pop("__metadata__", None)
        self.start = 8 + size

    def keys(self) -> list[str]:
        return list(self.header)

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.header[key]
        begin, end = entry["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.start + begin)
        self.file.readinto(memoryview(data.numpy()))
        if hasattr(os, "posix_fadvise"):  # the whole file: what was read ahead too
            os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return data.view(self.DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes in bfloat16 at full speed: a GPU, or a CPU that torch drives with AVX-512 and that
    has AVX-512 BF16 or AMX. Elsewhere (AVX2 laptops) bf16 matmuls and convolutions are emulated, slower than fp32."""
    if device.type != "cpu":
        return True
    native = [getattr(torch.cpu, name, bool)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(native) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cast_io(module: nn.Module, compute_dtype: torch.dtype, input_dtype: torch.dtype | None = None):
    """Hooks that run a module kept in bfloat16 inside a model computing in `compute_dtype`: its floating inputs
    cast to `input_dtype` (none: left alone), its output to `compute_dtype`."""
    if input_dtype is not None:
        module.register_forward_pre_hook(lambda _, args: tuple(
            arg.to(input_dtype) if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args))
    module.register_forward_hook(lambda _, args, output: output.to(compute_dtype))


def load_quanto_folder(cls, path, config, dtype=None, device_map=None, **kwargs):
    """The model of a folder `omnilmm-quantize` wrote: built on the meta device, the `Linear` layers its file holds
    quantized (`<layer>.weight._data`, quanto's serialization) made quanto `QLinear`s, then its tensors read one
    module at a time (`SafetensorsReader`), so that loading holds the quantized weights plus one layer.

    The rest computes in `dtype`: by default bfloat16 where the device computes it natively (`native_bfloat16`),
    float32 elsewhere. In float32 the quantized layers (whose kernels take bfloat16), the token embedding and the
    LM head stay in bfloat16, their inputs and outputs cast: they are nearly all the bytes, the rest is small."""
    from transformers import GenerationConfig
    from transformers.utils import cached_file

    try:  # (in a try: transformers asks every user of this file to install what it imports, unless so guarded)
        from optimum.quanto.nn import QModuleMixin, quantize_module
    except ImportError:
        raise ImportError(f"{path} holds optimum-quanto weights: pip install optimum-quanto") from None

    if kwargs.get("quantization_config") is not None:
        raise ValueError(f"{path} is quantized already ({config.quanto_weights}): leave out `quantization_config`")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype, dtype)
    if dtype not in (None, "auto", torch.bfloat16, torch.float32):
        raise ValueError(f"{path} holds {config.quanto_weights} weights: `dtype` may choose bfloat16 or float32 for "
                         f"the rest (by default the faster on this device), got {dtype}")
    if isinstance(device_map, dict) or device_map == "auto":
        raise ValueError("a quantized folder loads on one device: give `device_map` as a device (\"cpu\", \"cuda\")")
    device = torch.device(device_map or "cpu")
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if native_bfloat16(device) else torch.float32
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    index = cached_file(path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    names = sorted(set(json.loads(Path(index).read_text())["weight_map"].values())) if index else ["model.safetensors"]
    files = [cached_file(path, name, **hub) for name in names]
    with torch.device("meta"):
        model = cls(config)
    embeddings = {model.get_input_embeddings(), model.get_output_embeddings()}
    kept = {name for name, module in model.named_modules() if module in embeddings}  # stay bfloat16
    for file in files:
        with SafetensorsReader(file) as weights:
            owners = defaultdict(dict)  # module name -> {its state-dict key: the file's key}
            for key in weights.keys():
                owner, _, name = key.partition(".weight.") if ".weight._" in key else key.rpartition(".")
                owners[owner][f"weight.{name}" if ".weight._" in key else name] = key
            for owner, keys in owners.items():
                quantized = any(name.startswith("weight._") for name in keys)  # as the file says
                if quantized:
                    model.set_submodule(owner, quantize_module(model.get_submodule(owner),
                                                               weights=f"q{config.quanto_weights}"))
                state = {name: weights.get_tensor(key) for name, key in keys.items()}
                if not quantized and owner not in kept:
                    state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
                model.get_submodule(owner).load_state_dict(state, strict=False, assign=True)
                del state
                if MALLOC_TRIM is not None:  # glibc keeps the freed read and repacking buffers otherwise
                    MALLOC_TRIM(0)
    for module in model.modules():  # the buffers no checkpoint holds
        if getattr(module, "k_bias", None) is not None and module.k_bias.is_meta:  # timm EVA's zero key bias
            module.k_bias = torch.zeros_like(module.q_bias)
        elif getattr(module, "inv_freq", None) is not None and module.inv_freq.is_meta:  # rotary embedding
            module.__init__(module.config)
    model.tie_weights()
    missing = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} tensors (e.g. {missing[:3]}): run omnilmm-quantize again")
    if dtype != torch.bfloat16:
        cast_io(model.get_input_embeddings(), dtype)
        for module in [model.get_output_embeddings(), *filter(lambda m: isinstance(m, QModuleMixin), model.modules())]:
            cast_io(module, dtype, input_dtype=torch.bfloat16)
    model.config._name_or_path = model.name_or_path = str(path)
    if cached_file(path, "generation_config.json", _raise_exceptions_for_missing_entries=False, **hub):
        model.generation_config = GenerationConfig.from_pretrained(path, **hub)
    return model.to(device).eval()


def stream_answer(model, tokenizer, generate_kwargs):
    """`generate` in a thread, its text pieces as they come; an error in `generate` is raised here, in the caller."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors = []

    def run():
        try:
            model.generate(**generate_kwargs, streamer=streamer)
        except BaseException as error:  # noqa: BLE001 - handed to the caller below
            errors.append(error)
            streamer.end()

    threading.Thread(target=run, daemon=True).start()
    yield from filter(None, streamer)  # (no empty pieces)
    if errors:
        raise errors[0]


def content_parts(content) -> tuple[list[dict], list[tuple[str, object]]]:
    """A message's content → chat-template parts and its `("image" | "video", item)` in order."""
    content = [content] if isinstance(content, str) else content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"message content must be a string or a list of images and strings, got {type(content)}")
    parts, visuals = [], []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(item, str) or kind == "text":
            text = item if isinstance(item, str) else item.get("text")
            if not isinstance(text, str):
                raise TypeError(f"a text content part needs a string 'text', got {item!r}")
            parts.append({"type": "text", "text": text})
            continue
        if isinstance(item, dict):
            kind = "video" if kind in ("video", "video_url") else "image"
            value = next((item[k] for k in (kind, f"{kind}_url", "url", "path") if item.get(k) is not None), None)
            value = value.get("url") if isinstance(value, dict) else value
        else:
            is_video = (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4) or (
                isinstance(item, os.PathLike) and os.fspath(item).lower().endswith(VIDEO_SUFFIXES))
            kind, value = "video" if is_video else "image", item
        if value is None:
            raise TypeError(f"cannot read an image, a video or a text from the content part {item!r}")
        parts.append({"type": kind})
        visuals.append((kind, value))
    return parts, visuals


def chat_conversation(msgs, image=None, system_prompt=None) -> tuple[list[dict], list]:
    """`chat()`'s messages → a chat-template conversation and its `("image" | "video", item)` in order. `image` takes
    the place of an `<image>` written in the first user message, else goes in front of it; `system_prompt` goes
    first."""
    if not isinstance(msgs, (list, tuple)) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise ValueError("msgs must be a non-empty list of {'role': ..., 'content': ...} messages (or a list of them)")
    for message in msgs:
        if message.get("role") not in ("system", "user", "assistant") or "content" not in message:
            raise ValueError(f"each message needs a role (system, user or assistant) and a content, got {message!r}")
    msgs = list(msgs)
    if image is not None:
        first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first_user is None:
            roles = [m["role"] for m in msgs]
            raise ValueError(f"`image` goes in front of the first user message, but msgs has no user message: {roles}")
        content, part = msgs[first_user]["content"], {"type": "image", "image": image}
        content = list(content) if isinstance(content, (list, tuple)) else [content]
        if sum(isinstance(c, str) and c.count("<image>") for c in content) == 1:  # written where it goes
            at = next(i for i, c in enumerate(content) if isinstance(c, str) and "<image>" in c)
            before, after = content[at].split("<image>")
            content[at : at + 1] = [p for p in (before.rstrip("\n"), part, after.lstrip("\n")) if p != ""]
        else:
            content.insert(0, part)
        msgs[first_user] = {**msgs[first_user], "content": content}
    if system_prompt is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    conversation, visuals = [], []
    for message in msgs:
        parts, message_visuals = content_parts(message["content"])
        conversation.append({"role": message["role"], "content": parts})
        visuals.extend(message_visuals)
    return conversation, visuals


def visual_key(kind, item, max_pixels, settings) -> tuple | None:
    """A cache key for an image or video given to `chat()`: a PIL image's pixels (a video's: each frame's), or a
    file's path, size and mtime, with the settings; `None` (processed every time) for anything else and for images
    the processor would refuse."""
    try:
        if isinstance(item, (str, os.PathLike)) and os.path.isfile(item):
            stat = os.stat(item)
            return kind, "file", os.path.abspath(item), stat.st_size, stat.st_mtime_ns, settings
        frames = [item] if kind == "image" else item
        if isinstance(frames, (list, tuple)) and frames and all(
            isinstance(x, Image.Image) and x.width * x.height <= max_pixels for x in frames
        ):
            digests = tuple((x.mode, x.size, x.getexif().get(0x0112), hashlib.sha1(x.tobytes()).hexdigest())
                            for x in frames)  # (0x0112: the EXIF orientation tag)
            return kind, "pixels", digests, settings
    except (OSError, ValueError):  # closed, truncated or corrupt: the processor names the problem
        return None
    return None


def still_sampled_alike(processor, prompt, entries, video_kwargs) -> bool:
    """Whether the cached videos among a prompt's cached `entries` (image: `(grid, views, None)`; video: `(grids,
    views, metadata)`) would be sampled to the same frames, sliced alike, in the room this prompt leaves for them."""
    if all(meta is None for _, _, meta in entries):
        return True
    room = processor.video_views(prompt, [grid for grid, _, meta in entries if meta is None])
    return all(meta is None or processor.video_processor.plan(meta, room, **video_kwargs) ==
               (list(meta.frames_indices), grids[0] is not None) for grids, _, meta in entries)


__all__ = ["OmniLMMPreTrainedModel", "OmniLMMModel", "OmniLMMForCausalLM"]
