"""OmniLMM in vLLM: vLLM's own Mistral decoder (paged attention, continuous batching, tensor parallelism) under the
vision tower and resampler of the model folder's own remote code, fed by the folder's own processor.

One source of the math: the vision side is `modeling_omnilmm.build_vision_tower`, `Resampler` and
`OmniLMMModel.get_image_features` of the served folder, and every image is preprocessed and expanded into its spans
by the folder's `OmniLMMProcessor`, so a prompt reaches the decoder with the same token ids and the same image
features as in `transformers`. Weights load from the folder unchanged.
"""

import re
import sys
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from transformers import BatchFeature
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdateDetails,
)


def remote_modeling(model_config):
    """The served folder's `modeling_omnilmm` module (its remote code, as `transformers` loads it)."""
    cls = get_class_from_dynamic_module(
        "modeling_omnilmm.OmniLMMModel", model_config.model, revision=model_config.code_revision
    )
    return sys.modules[cls.__module__]


def prompt_text(tokenizer, token_ids) -> str:
    """The text `token_ids` were tokenized from: special tokens as written, each run of other tokens decoded on its
    own (a whole-prompt `decode` adds a space after every special token, which tokenizes differently)."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    pieces, run = [], []
    for token in [*token_ids, None]:
        if token is not None and token not in special:
            run.append(token)
            continue
        if run:
            pieces.append(tokenizer.decode(run))
            run = []
        if token is not None:
            pieces.append(tokenizer.convert_ids_to_tokens(token))
    return "".join(pieces)


def image_views(pixel_values) -> list[list[torch.Tensor]]:
    """vLLM's batch of `pixel_values` (per image a list of `(3, H, W)` views, or a stacked tensor of them) → per
    image, the list of its views."""
    return [[image] if isinstance(image, torch.Tensor) and image.ndim == 3 else list(image) for image in pixel_values]


class OmniLMMProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None, "video": None}

    def get_data_parser(self) -> MultiModalDataParser:
        """Videos come with their metadata (the frames OmniLMM's loader sampled, `omnilmm_tools.vllm_video`)."""
        return MultiModalDataParser(video_needs_metadata=True)

    def max_num_frames(self) -> int:
        """The most frames of a video this engine planned its memory for (`--media-io-kwargs`, else the video
        processor's)."""
        configured = self.ctx.model_config.multimodal_config.media_io_kwargs.get("video", {}).get("max_num_frames")
        return int(configured or self.get_hf_processor().video_processor.max_num_frames)

    def engine_kwargs(self) -> dict:
        """The server's `mm_processor_kwargs` (`--mm-processor-kwargs`), flat."""
        merged = dict(self.ctx.get_merged_mm_kwargs({}))
        return {**merged.pop("images_kwargs", {}), **merged}

    def max_slice_nums(self) -> int:
        """The most tiles per image this engine planned its memory for (a request may ask for fewer)."""
        return int(self.engine_kwargs().get("max_slice_nums", self.get_hf_processor().image_processor.max_slice_nums))

    def get_image_size_with_most_features(self) -> ImageSize:
        """A wide image that takes `max_slice_nums` tiles in one row (the most image tokens)."""
        processor, limit = self.get_hf_processor(), self.max_slice_nums()
        side = self.engine_kwargs().get("scale_resolution", processor.image_processor.scale_resolution)
        sizes = [ImageSize(width=side * n, height=side) for n in range(1, limit + 1)]
        counts = processor._get_num_multimodal_tokens([(s.height, s.width) for s in sizes], max_slice_nums=limit)
        counts = counts["num_image_tokens"]
        return sizes[max(range(len(sizes)), key=counts.__getitem__)]


class OmniLMMDummyInputsBuilder(BaseDummyInputsBuilder[OmniLMMProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        processor = self.info.get_hf_processor()
        return processor.image_token * mm_counts.get("image", 0) + processor.video_token * mm_counts.get("video", 0)

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        size = self.info.get_image_size_with_most_features()
        overrides = (mm_options or {}).get("image")
        images = self._get_dummy_images(
            width=size.width, height=size.height, num_images=mm_counts.get("image", 0), overrides=overrides
        )
        return {"image": images, "video": self.dummy_videos(size, mm_counts.get("video", 0), mm_options)}

    def dummy_videos(self, size: ImageSize, count: int, mm_options) -> list:
        """Videos of the most views: `max_num_frames` unsliced frames, or the most frames that are still sliced, of
        the image size with the most tiles; with the metadata of frames sampled already."""
        processor, most = self.info.get_hf_processor(), self.info.max_num_frames()
        sliced = min(most, processor.video_processor.max_sliced_frames)
        views = processor._get_num_multimodal_tokens(video_sizes=[(most, size.height, size.width),
                                                                  (sliced, size.height, size.width)])
        frames = most if views["num_video_tokens"][0] >= views["num_video_tokens"][1] else sliced
        videos = self._get_dummy_videos(width=size.width, height=size.height, num_frames=frames, num_videos=count,
                                        overrides=(mm_options or {}).get("video"))
        return [(video, {"total_num_frames": len(video), "fps": 1.0, "frames_indices": list(range(len(video))),
                         "video_backend": "dummy", "do_sample_frames": False}) for video in videos]


class OmniLMMMultiModalProcessor(BaseMultiModalProcessor[OmniLMMProcessingInfo]):
    """The folder's `OmniLMMProcessor` preprocesses each image (its views and slice grid); each `<image>` of the
    prompt becomes that image's spans, tokenized as the processor tokenizes them."""

    def _call_hf_processor(self, hf_data, hf_kwargs) -> BatchFeature:
        requested = hf_kwargs.get("max_slice_nums", (hf_kwargs.get("images_kwargs") or {}).get("max_slice_nums"))
        limit = self.info.max_slice_nums()
        if isinstance(requested, int) and not isinstance(requested, bool) and requested > limit:
            raise ValueError(
                f"max_slice_nums={requested} is more than this server allows ({limit}: what it planned its memory "
                f"for); start it with --mm-processor-kwargs '{{\"max_slice_nums\": {requested}}}' to allow more"
            )
        hf_data, videos = dict(hf_data), hf_data.get("videos") or []
        hf_data.pop("videos", None)
        out = {}
        try:
            if hf_data.get("images"):
                images = super()._call_hf_processor(hf_data, hf_kwargs)
                grids = [sample[0] for sample in images["slice_grids"]]  # one image per sample: images without text
                out["pixel_values"] = [list(views) for views in images["pixel_values"]]
                out["slice_grid"] = torch.tensor([grid or (0, 0) for grid in grids])
            if videos:
                out.update(self.process_videos(videos, hf_kwargs))
        except ValueError as error:  # vLLM wraps the processor's error in one that does not say what is wrong
            raise ValueError(str(error.__cause__ or error)) from error
        return BatchFeature(out)

    def process_videos(self, videos, hf_kwargs) -> dict:
        """Videos as OmniLMM's loader sampled them (`(frames, metadata)`) through the folder's video processor, frames
        as they are: per video its views and `(frames, 2)` slice grids (`(0, 0)`: not sliced)."""
        video_processor = self.info.get_hf_processor().video_processor
        merged = dict(self.info.ctx.get_merged_mm_kwargs(hf_kwargs))
        merged.update(merged.pop("videos_kwargs", None) or {})
        settings = {k: v for k, v in merged.items() if k in video_processor.setting_names and k != "do_sample_frames"}
        out = {"video_pixel_values": [], "video_slice_grids": []}
        for frames, metadata in videos:
            given = {k: v for k, v in metadata.items() if k != "do_sample_frames"}
            video = video_processor(list(frames), video_metadata=given, do_sample_frames=False, **settings)
            out["video_pixel_values"].append(list(video["pixel_values_videos"][0]))
            out["video_slice_grids"].append(torch.tensor([g or (0, 0) for g in video["video_slice_grids"][0]]))
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        return {
            "pixel_values": MultiModalFieldConfig.batched("image"),
            "slice_grid": MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            "video_pixel_values": MultiModalFieldConfig.batched("video"),
            "video_slice_grids": MultiModalFieldConfig.batched("video", keep_on_cpu=True),
        }

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        processor = self.info.get_hf_processor()
        tokenizer = self.info.get_tokenizer()

        def spans(text: str) -> PromptUpdateDetails:
            ids = tokenizer.encode(text, add_special_tokens=False)
            return PromptUpdateDetails.select_token_id(ids, embed_token_id=processor.im_patch_token_id)

        def image_spans(item_idx: int) -> PromptUpdateDetails:
            cols, rows = out_mm_kwargs["image"][item_idx]["slice_grid"].data.tolist()
            return spans(processor.image_placeholder((cols, rows) if cols else None))

        def video_spans(item_idx: int) -> PromptUpdateDetails:
            grids = out_mm_kwargs["video"][item_idx]["video_slice_grids"].data.tolist()
            return spans(processor.replace_video_token({"slice_grids": [[g if g[0] else None for g in grids]]}, 0))

        return [PromptReplacement(modality="image", target=processor.image_token, replacement=image_spans),
                PromptReplacement(modality="video", target=processor.video_token, replacement=video_spans)]

    def _apply_prompt_updates(self, token_ids, mm_prompt_updates):
        """Expand each `<image>` and `<video>` in the text and tokenize the result, as `OmniLMMProcessor` does
        (replacing its tokens in place would tokenize the text next to an image differently), BOS once."""
        tokenizer, processor = self.info.get_tokenizer(), self.info.get_hf_processor()
        if any(token in processor.image_token_ids for token in token_ids):
            raise ValueError("the prompt holds literal <im_start>/<im_patch>/<im_end> tokens: give images as image "
                             "content parts (or <image> placeholders with multi_modal_data), not as image tokens")
        placeholders = {"image": processor.image_token, "video": processor.video_token}
        updates = {kind: [item[0] for item in mm_prompt_updates.get(kind, [])] for kind in placeholders}
        pieces = re.split(f"({re.escape(processor.image_token)}|{re.escape(processor.video_token)})",
                          prompt_text(tokenizer, token_ids))
        for kind, placeholder in placeholders.items():
            if pieces[1::2].count(placeholder) != len(updates[kind]):
                raise ValueError(f"the prompt has {pieces[1::2].count(placeholder)} {placeholder} placeholder(s) but "
                                 f"{len(updates[kind])} {kind}(s) were given; give one placeholder per {kind}")
        left = {placeholder: iter(updates[kind]) for kind, placeholder in placeholders.items()}
        pieces[1::2] = [prompt_text(tokenizer, next(left[p]).content.full) for p in pieces[1::2]]
        new_ids = tokenizer.encode("".join(pieces), add_special_tokens=False)
        if new_ids[:2] == [tokenizer.bos_token_id] * 2:  # a rendered chat prompt (it has BOS) tokenized with BOS
            new_ids = new_ids[1:]  # never two, as in the processor
        found = {kind: [[u] for u in items] for kind, items in updates.items() if items}
        return new_ids, self._find_mm_placeholders(new_ids, found)


@MULTIMODAL_REGISTRY.register_processor(
    OmniLMMMultiModalProcessor, info=OmniLMMProcessingInfo, dummy_inputs=OmniLMMDummyInputsBuilder
)
class OmniLMMForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    """vLLM's `MistralForCausalLM` as the decoder, the remote code's vision tower and resampler for the images
    (state-dict names as in the folder: `model.vision_tower.*`, `model.resampler.*`, `model.*`, `lm_head.*`)."""

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "model.vision_tower.": "vision_tower.",
        "model.resampler.": "resampler.",
        "model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        if modality.startswith("video"):
            return "<video>"
        raise ValueError(f"OmniLMM reads images, videos and text, not {modality}")

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        config = self.config = vllm_config.model_config.hf_config
        self.remote = remote_modeling(vllm_config.model_config)
        self.image_span_ids = [config.im_patch_token_id, config.im_start_token_id, config.im_end_token_id]
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = self.remote.build_vision_tower(config)
            self.resampler = self.remote.Resampler(
                num_queries=config.num_query, embed_dim=config.hidden_size, num_heads=config.hidden_size // 128,
                kv_dim=self.vision_tower.embed_dim,
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config, prefix=maybe_prefix(prefix, "language_model"),
                architectures=["MistralForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def vision_outputs(self, *args, **kwargs):
        """`OmniLMMModel.vision_outputs` of the remote code (it reads only `vision_tower`)."""
        return self.remote.OmniLMMModel.vision_outputs(self, *args, **kwargs)

    def encode_images(self, *args, **kwargs) -> torch.Tensor:
        """`OmniLMMModel.encode_images` of the remote code (it reads only `vision_tower` and `resampler`)."""
        return self.remote.OmniLMMModel.encode_images(self, *args, **kwargs)

    def embed_multimodal(self, **kwargs) -> list[torch.Tensor]:
        """Per image (or video: all its frames), its `(views * num_query, hidden)` features, by the remote code's
        `get_image_features`. vLLM calls it for one modality at a time."""
        pixel_values = kwargs.get("pixel_values", kwargs.get("video_pixel_values"))
        if pixel_values is None:
            return []
        views = image_views(pixel_values)
        flat = [view for image in views for view in image]
        features = self.remote.OmniLMMModel.get_image_features(self, flat).pooler_output
        return [f.flatten(0, 1) for f in features.split([len(image) for image in views])]

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Mistral's logits; the image-span tokens are input only and never generated (as the folder's
        `generation_config.json` suppresses them in `transformers`)."""
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:
            logits[..., self.image_span_ids] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
