"""`omnilmm-finetune`: fine-tune an OmniLMM Hub folder (or a fresh random model) on MiniCPM-V-format data.

The data (MiniCPM-V's fine-tuning format) is one JSON list of samples
``{"id": ..., "image": "a.png" | {"<image_00>": "a.png", "<image_01>": "b.png"}, "conversations": [{"role": "user",
"content": "<image>\\nWhat is this?"}, {"role": "assistant", "content": "..."}, ...]}``:
several images per sample and several turns are fine. Images are placed where their placeholder is: ``<image>``, or
for a dict of images its keys (``<image_00>`` ...) written in the text; a single image with no placeholder goes in
front of the first user message (as MiniCPM-V's trainer does). Videos likewise: ``"video": "clip.mp4" | {...} |
[...]`` at ``<video>`` (or ``<video_00>`` ...) placeholders, decoded and sampled by the processor (``--video-fps``,
``--max-num-frames``). Each image goes through the processor (slicing included), the conversation through the chat
template (Zephyr's), and only the assistant tokens and their closing ``</s>`` carry labels.

Training is the Hugging Face `Trainer` (progress bars, logging, checkpoints, DeepSpeed, multi-process): run it
under ``torchrun --nproc_per_node N`` or ``accelerate launch`` for several processes (CPU: gloo). The global batch is
``--batch-size x processes x --grad-accum``. The output folder is a Hub folder that
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` loads; a LoRA run saves the adapter (and, with
``--merge-lora``, the merged model).

    omnilmm-finetune --model ./omnilmm-12b-hf --data train.json --output ./out --lora --bf16 \\
        --gradient-checkpointing --deepspeed configs/deepspeed_zero2.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .cli import Parser, positive_float, positive_int
from .remote import remote_module
from .tokenizer import save_processor

IGNORE_INDEX = -100
VISUALS = ("image", "video")  # what a sample may give (`"image"` / `"video"`), placed at `<image>` / `<video>`
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}


class BadSample(ValueError):
    """A sample that cannot be trained on (missing image, placeholder/image mismatch, malformed conversation...)."""

    def __init__(self, sample_id, reason: str):
        super().__init__(f"sample {sample_id!r}: {reason}")
        self.sample_id = sample_id
        self.reason = reason


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str, all_ranks: bool = False) -> None:
    if all_ranks or is_main_process():
        print(f"omnilmm-finetune: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Samples: JSON → messages with <image> / <video> placeholders + file paths in placeholder order
# --------------------------------------------------------------------------------------------------------------------


def parse_sample(sample: dict, base_dir: Path) -> tuple[list[dict], dict[str, list[Path]]]:
    """One sample (MiniCPM-V's format) → `(messages, {"image": paths, "video": paths})`. The messages' user contents
    hold one ``<image>`` per image and one ``<video>`` per video, in the order of the paths. Raises `BadSample` naming
    the sample's id for anything that cannot be trained on."""
    sample_id = sample.get("id", "?") if isinstance(sample, dict) else "?"
    if not isinstance(sample, dict):
        raise BadSample(sample_id, f"a sample must be a JSON object, got {type(sample).__name__}")
    conversations = sample.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise BadSample(sample_id, "it has no 'conversations' list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict):
            raise BadSample(sample_id, "every conversation turn must be an object with 'role' and 'content'")
        role = ROLE_ALIASES.get(turn.get("role", turn.get("from")))
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise BadSample(sample_id, f"a turn needs a role (user/assistant/system) and a string content, got {turn}")
        messages.append({"role": role, "content": content})
    if messages[0]["role"] == "system":
        system, rest = messages[:1], messages[1:]
    else:
        system, rest = [], messages
    if not rest or any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(rest)):
        raise BadSample(sample_id, "turns must alternate user, assistant, user, ... (after an optional system turn)")
    if rest[-1]["role"] != "assistant":
        raise BadSample(sample_id, "the conversation must end with an assistant turn")
    messages = system + rest
    for message in messages:
        for kind in VISUALS:
            if message["role"] == "assistant" and (f"<{kind}>" in message["content"] or numbered(kind).search(
                    message["content"])):
                raise BadSample(sample_id, f"an assistant turn holds an {kind} placeholder")
    files = {kind: place_files(sample_id, messages, sample.get(kind, sample.get(f"{kind}s")), kind)
             for kind in VISUALS}
    resolved = {kind: [] for kind in VISUALS}
    for kind, paths in files.items():
        for path in paths:
            if not isinstance(path, str):
                raise BadSample(sample_id, f"{kind} paths must be strings, got {path!r}")
            full = Path(path) if os.path.isabs(path) else base_dir / path
            if not full.is_file():
                raise BadSample(sample_id, f"{kind} file {str(full)!r} does not exist")
            resolved[kind].append(full)
    return messages, resolved


def numbered(kind: str) -> re.Pattern:
    return re.compile(rf"<{kind}_\d+>")


def place_files(sample_id, messages: list[dict], given, kind: str) -> list:
    """A sample's `kind` files ("image" or "video": a path, a dict placeholder -> path, or a list) in the order of
    their placeholders, which become `<image>` / `<video>` in `messages`: ``<kind>`` placeholders take the files in the
    order given, numbered keys (``<image_00>`` ...) written in the text take theirs, and a single file with no
    placeholder goes in front of the first user message (as MiniCPM-V's trainer does)."""
    placeholder = f"<{kind}>"
    if given is None or given == {} or given == []:
        files = {}
    elif isinstance(given, str):
        files = {placeholder: given}
    elif isinstance(given, dict):
        files = dict(given)
    elif isinstance(given, list):
        files = {f"<{kind}_{i:02d}>": path for i, path in enumerate(given)}
    else:
        raise BadSample(sample_id, f"'{kind}' must be a path, a dict of placeholder -> path or a list, got "
                                   f"{type(given).__name__}")
    paths: list = []
    keys = [key for key in files if key != placeholder]
    keyed_in_text = [key for key in keys if any(key in m["content"] for m in messages)]
    if keyed_in_text:  # "<image_00>"-style placeholders written in the text: each key once, in order of appearance
        if len(keyed_in_text) != len(keys):
            missing = [key for key in keys if key not in keyed_in_text]
            raise BadSample(sample_id, f"{kind}s {missing} have no placeholder in the conversation")
        found = []
        for index, message in enumerate(messages):
            if placeholder in message["content"]:
                raise BadSample(sample_id, f"it mixes {placeholder} with <{kind}_NN> placeholders")
            for key in keys:
                count = message["content"].count(key)
                if count > 1 or (count and any(key in m["content"] for m in messages[index + 1 :])):
                    raise BadSample(sample_id, f"the placeholder {key} appears more than once")
                if count:
                    found.append((index, message["content"].index(key), key))
        for index, _, key in sorted(found):
            messages[index]["content"] = messages[index]["content"].replace(key, placeholder)
            paths.append(files[key])
    else:  # "<image>" placeholders take the files in the order given (dict keys in their order)
        paths = list(files.values())
        count = sum(m["content"].count(placeholder) for m in messages)
        if count == 0 and len(paths) == 1:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"] = f"{placeholder}\n{first_user['content']}"
            count = 1
        if count != len(paths):
            raise BadSample(sample_id, f"{count} {kind} placeholders in the text but {len(paths)} {kind}s")
    leftover = [m["content"] for m in messages if numbered(kind).search(m["content"])]
    if leftover:
        raise BadSample(sample_id, f"placeholders {numbered(kind).findall(leftover[0])} have no {kind}")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Conversation → input_ids, labels, pixel_values
# --------------------------------------------------------------------------------------------------------------------


def render_chat(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The chat-template text of `messages` and the character ranges of its `{% generation %}` blocks (each
    assistant content and the `</s>` that closes it), as `apply_chat_template(..., return_assistant_tokens_mask=True)`
    finds them (that call itself cannot take the images of string contents on transformers 5.17)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = processor.chat_template or processor.tokenizer.chat_template
    prompts, ranges = render_jinja_template(conversations=[messages], chat_template=template,
                                            return_assistant_tokens_mask=True, **processor.tokenizer.special_tokens_map)
    if not ranges[0]:
        raise ValueError("the chat template marks no assistant turn with {% generation %}: cannot find the assistant "
                         "tokens that carry labels")
    return prompts[0], [tuple(span) for span in ranges[0]]


def build_example(processor, messages: list[dict], images: list, max_slice_nums=None, max_length: int | None = None,
                  sample_id="?", videos=(), video_kwargs=None) -> dict:
    """One training example: ``input_ids``, ``labels`` (1-D tensors) and ``pixel_values`` (a list of ``(3, H, W)``
    tensors in span order). `messages` hold one ``<image>`` per image of `images` (PIL images or paths) and one
    ``<video>`` per video of `videos` (files, sampled with `video_kwargs`: ``fps``, ``max_num_frames``), in order.

    The conversation is rendered with the chat template and then goes through the processor exactly as a prompt
    does at inference (placeholder expansion, slicing, BOS, span checks); the tokens inside the assistant turns
    (and their closing ``</s>``) get labels, found from the tokenizer's character offsets in the rendered text."""
    text, ranges = render_chat(processor, messages)
    kwargs = {**(video_kwargs or {}), **({} if max_slice_nums is None else {"max_slice_nums": max_slice_nums})}
    try:
        encoding = processor(
            text=[text],
            images=[list(images)] if images else None,
            videos=[list(videos)] if videos else None,
            padding=False,
            return_tensors=None,
            return_offsets_mapping=True,  # in `text` (a token of an image span: its placeholder's range)
            **kwargs,
        )
    except (ValueError, TypeError, OSError, ImportError) as error:  # (ImportError: a video without PyAV)
        raise BadSample(sample_id, str(error)) from None
    input_ids = torch.tensor(encoding["input_ids"][0], dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for position, (start, stop) in enumerate(encoding["offset_mapping"][0]):
        if stop > start and any(a <= start and stop <= b for a, b in ranges):
            labels[position] = input_ids[position]
    if max_length is not None and len(input_ids) > max_length:
        raise BadSample(sample_id, f"it is {len(input_ids)} tokens long, more than --max-length {max_length} (it is "
                                   "not truncated: that could cut an image span)")
    if (labels != IGNORE_INDEX).sum() == 0:
        raise BadSample(sample_id, "no token carries a label (empty assistant turns?)")
    pixel_values = list(encoding["pixel_values"][0]) if images or videos else []
    return {"input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


class SupervisedDataset(Dataset):
    """MiniCPM-V-format JSON → training examples, built on access. Samples that fail the up-front checks (missing image
    file, placeholder/image count mismatch, malformed conversation) are dropped with a message naming their id
    (``bad_sample="skip"``) or stop everything (``"stop"``); a sample that fails later (an unreadable image, too
    long) is replaced by the next good one, or stops."""

    def __init__(self, data_path, processor, max_slice_nums=None, max_length=2048, bad_sample="skip",
                 video_kwargs=None):
        data_path = Path(data_path)
        raw = json.loads(data_path.read_text())
        if not isinstance(raw, list):
            raise ValueError(f"{data_path} must hold a JSON list of samples")
        self.processor = processor
        self.max_slice_nums, self.max_length, self.bad_sample = max_slice_nums, max_length, bad_sample
        self.video_kwargs = dict(video_kwargs or {})
        self.samples, self.skipped = [], []
        for sample in raw:
            try:
                messages, paths = parse_sample(sample, data_path.parent)
            except BadSample as error:
                self.handle_bad(error)
                continue
            self.samples.append((str(sample.get("id", len(self.samples))), messages, paths))
        if not self.samples:
            raise ValueError(f"{data_path} has no usable samples")

    def handle_bad(self, error: BadSample):
        if self.bad_sample == "stop":
            raise SystemExit(f"omnilmm-finetune: bad {error} (stopping; --bad-sample skip would skip it)")
        self.skipped.append(error.sample_id)
        say(f"skipping bad {error}")

    def __len__(self):
        return len(self.samples)

    def example(self, index: int) -> dict:
        sample_id, messages, paths = self.samples[index]
        try:
            from PIL import Image

            images = []
            for path in paths["image"]:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
        except Exception as error:  # unreadable or corrupt image
            raise BadSample(sample_id, f"cannot read its images: {error}") from None
        messages = [dict(m) for m in messages]
        return build_example(self.processor, messages, images, self.max_slice_nums, self.max_length, sample_id,
                             [str(path) for path in paths["video"]], self.video_kwargs)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.samples)):
            current = (index + attempt) % len(self.samples)
            try:
                return self.example(current)
            except BadSample as error:
                if self.bad_sample == "stop":
                    raise SystemExit(f"omnilmm-finetune: bad {error} (stopping; --bad-sample skip would skip it)")
                say(f"skipping bad {error}; using the next sample instead", all_ranks=True)
        raise RuntimeError("no sample of the data set can be built")


@dataclass
class Collator:
    """Right-pads ``input_ids`` (pad token, attention mask 0) and ``labels`` (-100); ``pixel_values`` stays a list
    per sample of lists of ``(3, H, W)`` tensors (slices differ in size)."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = example["input_ids"]
            labels[row, :n] = example["labels"]
            attention_mask[row, :n] = 1
        pixel_values = [list(e["pixel_values"]) for e in examples]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def make_trainer_class():
    """`Trainer` whose loss runs the LM head only where a label is: the logits of the other positions (the prompt,
    the image spans, the padding; most of a sequence) are never computed. Exactly the shifted causal-LM loss of
    `OmniLMMForCausalLM` (mean over labelled tokens, or over `num_items_in_batch` across accumulation steps and
    processes), several times faster and lighter for a 32,009-token vocabulary."""
    import torch.nn.functional as F
    from transformers import Trainer

    class OmniLMMTrainer(Trainer):
        def lm_head(self, model):
            unwrapped = self.accelerator.unwrap_model(model)
            if hasattr(unwrapped, "get_base_model"):  # PEFT
                unwrapped = unwrapped.get_base_model()
            return unwrapped.lm_head

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            targets = labels[:, 1:]
            keep = torch.zeros_like(labels, dtype=torch.bool)
            keep[:, :-1] = targets != IGNORE_INDEX  # position t predicts token t + 1
            hook = self.lm_head(model).register_forward_pre_hook(lambda module, args: (args[0][keep], *args[1:]))
            try:
                outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            finally:
                hook.remove()
            loss = F.cross_entropy(outputs.logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")
            if num_items_in_batch is None:
                loss = loss / max(int((targets != IGNORE_INDEX).sum()), 1)
            else:
                loss = loss / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
            return (loss, outputs) if return_outputs else loss

    return OmniLMMTrainer


# --------------------------------------------------------------------------------------------------------------------
# Model, processor, trainable parameters
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sincos_eva_positions(tower) -> None:
    """A new EVA tower's absolute positions: MAE's 2-D sin-cos table for the patches, zeros for the class token.
    (timm's random 0.02 table is too faint next to the patch embeddings for a tower trained from scratch to learn
    where its patches are.) Square patch grids only; others keep timm's table."""
    grid_h, grid_w = tower.patch_embed.grid_size
    if tower.pos_embed is None or grid_h != grid_w or tower.embed_dim % 4:
        return
    table = remote_module("resampler").get_2d_sincos_pos_embed(tower.embed_dim, grid_h)
    prefix = tower.pos_embed.shape[1] - grid_h * grid_w
    tower.pos_embed.copy_(torch.cat([torch.zeros(prefix, tower.embed_dim), table])[None])


def init_from_config(spec: str):
    """`--init-config`: a JSON file or inline JSON object with OmniLMMConfig keyword arguments and, under
    ``"image_processor"``, OmniLMMImageProcessor ones. Returns a fresh random model and its processor."""
    text = Path(spec).read_text() if Path(spec).is_file() else spec
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"omnilmm-finetune: --init-config must be a JSON file or a JSON object: {error}") from None
    image_processor_kwargs = settings.pop("image_processor", {})
    settings.pop("_comment", None)
    config = remote_module("configuration_omnilmm").OmniLMMConfig(**settings)
    model = remote_module("modeling_omnilmm").OmniLMMForCausalLM(config)
    sincos_eva_positions(model.model.vision_tower)
    from .tokenizer import build_tokenizer

    image_processor = remote_module("image_processing_omnilmm").OmniLMMImageProcessor(
        image_size=config.image_size, **image_processor_kwargs
    )
    processor = remote_module("processing_omnilmm").OmniLMMProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), num_query=config.num_query,
        max_position_embeddings=config.max_position_embeddings,
    )
    return model, processor


def load_model_and_processor(args):
    from transformers import AutoModelForCausalLM, AutoProcessor

    if args.init_config:
        model, processor = init_from_config(args.init_config)
    else:
        dtype = torch.bfloat16 if args.qlora and args.bf16 else torch.float32  # (QLoRA: the frozen tower in bf16)
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=dtype,
                                                     quantization_config=qlora_config(args))
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    if args.max_slice_nums is not None:
        processor.image_processor.max_slice_nums = args.max_slice_nums
    if args.attn_implementation:
        model.config._attn_implementation = args.attn_implementation
    return model, processor


QLORA_KEEP = ["lm_head", "model.resampler", "model.vision_tower"]  # frozen or trained fully: not in 4 bits


def qlora_config(args):
    """QLoRA's base (`--qlora`): the decoder's linear layers in 4-bit NF4 with double quantization (bitsandbytes),
    computed in bf16 with `--bf16`, else fp32; `None` without `--qlora`."""
    if not args.qlora:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("omnilmm-finetune: --qlora needs bitsandbytes: pip install 'omnilmm-hf[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if args.bf16 else torch.float32,
                              llm_int8_skip_modules=QLORA_KEEP)


def lora_target_regex(targets: list[str]) -> str:
    """A PEFT `target_modules` regex that only matches the decoder's layers (never the vision tower/resampler)."""
    names = "|".join(re.escape(t) for t in targets)
    return rf"model\.layers\.\d+\.(self_attn|mlp)\.({names})"


def set_trainable(model, args):
    """Freeze / unfreeze the vision tower, the resampler (always trained) and the LLM; wrap with LoRA if asked."""
    inner = model.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        modules_to_save = ["resampler"] + (["vision_tower"] if args.tune_vision else [])
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=lora_target_regex(args.lora_target_modules),
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        return model
    inner.resampler.requires_grad_(True)
    if args.tune_vision:
        inner.vision_tower.requires_grad_(True)
    if args.tune_llm:
        for module in (inner.embed_tokens, inner.layers, inner.norm, model.lm_head):
            module.requires_grad_(True)
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------------


def write_generation_config(model, dst: Path, decoding: str = "keep") -> None:
    """`generation_config.json` for the saved `model`. `decoding`: "keep" the model's own settings (a fresh model
    has none: the original `chat()`'s sampling), "greedy", or "sampling" (the original's settings)."""
    from transformers import GenerationConfig

    from .convert import SAMPLING_DEFAULTS, image_span_token_ids

    source = model.generation_config
    base = {k: v for k, v in source.to_diff_dict().items() if not k.startswith("_") and k != "transformers_version"}
    settings = {}
    if decoding != "keep" or getattr(source, "_from_model_config", False):
        for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty"):
            base.pop(key, None)
        settings = {"do_sample": False} if decoding == "greedy" else dict(SAMPLING_DEFAULTS)
    config = model.config
    values = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": 0,
              "max_new_tokens": 1024, **base, **settings, "use_cache": True,
              "suppress_tokens": image_span_token_ids(config)}
    GenerationConfig(**values).save_pretrained(dst)


def save_hub_folder(model, processor, dst: Path, dtype: torch.dtype | None = None, decoding: str = "keep",
                    state_dict: dict | None = None) -> None:
    """`model` (an OmniLMMForCausalLM; its weights, or `state_dict`) as a self-contained Hub folder: config,
    safetensors, processor and tokenizer files, the remote-code .py files and generation_config.json (see
    `write_generation_config`)."""
    from .convert import copy_remote_code

    dst.mkdir(parents=True, exist_ok=True)
    if dtype is not None and state_dict is not None:
        state_dict = {name: tensor.to(dtype) for name, tensor in state_dict.items()}
    elif dtype is not None:
        model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(dst, state_dict=state_dict)
    save_processor(processor, dst)
    copy_remote_code(dst)
    write_generation_config(model, dst, decoding)


def save_outputs(trainer, model, processor, args) -> None:
    output = Path(args.output)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": None}[args.save_dtype]
    state_dict = None  # the model's own
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # whole, on the main process
        if not trainer.accelerator.is_main_process:
            return
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():  # (ZeRO-3 leaves `model` a partition: its gathered state is saved)
            model.load_state_dict(state_dict, strict=False)
            state_dict = None
    if not trainer.is_world_process_zero():
        return
    if args.lora:
        adapter_dir = output / "adapter" if args.merge_lora else output
        base_dir = output / "base_model" if args.init_config else Path(args.model)  # the base saved before training
        model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
        model.save_pretrained(adapter_dir, state_dict=state_dict)
        if args.merge_lora and state_dict is not None:
            raise SystemExit("omnilmm-finetune: --merge-lora cannot merge a ZeRO-3 partition; the adapter is saved in "
                             f"{adapter_dir}: merge it afterwards (PeftModel.from_pretrained(base, ...).merge_and_unload())")
        if not args.merge_lora:
            save_processor(processor, adapter_dir)
            say(f"saved the LoRA adapter to {adapter_dir} (load: PeftModel.from_pretrained(base, {str(adapter_dir)!r}))")
            return
        merged = model.merge_and_unload()
        save_hub_folder(merged, processor, output, dtype, args.generation_config)
        say(f"saved the merged model to {output} and the adapter to {adapter_dir}")
        return
    save_hub_folder(model, processor, output, dtype, args.generation_config, state_dict)
    say(f"saved the model to {output}")


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = Parser("omnilmm-finetune", __doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an OmniLMM Hub folder (config, weights, processor) to start from")
    source.add_argument("--init-config", help="start from a fresh random model: a JSON file (or inline JSON) of "
                        "OmniLMMConfig arguments, with image-processor arguments under \"image_processor\"")
    parser.add_argument("--data", required=True, help="training data: a JSON list in MiniCPM-V's fine-tuning format (see the README)")
    parser.add_argument("--output", required=True, help="folder for the fine-tuned Hub folder (and checkpoints)")
    parser.add_argument("--tune-vision", action=argparse.BooleanOptionalAction, default=True, help="train the vision tower")
    parser.add_argument("--tune-llm", action=argparse.BooleanOptionalAction, default=True,
                        help="train the language model fully (ignored with --lora, which trains adapters instead)")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the LLM; the resampler is trained fully")
    parser.add_argument("--qlora", action="store_true",
                        help="QLoRA: LoRA adapters (as --lora) on a 4-bit NF4 decoder (bitsandbytes)")
    parser.add_argument("--lora-target-modules", default=",".join(DEFAULT_LORA_TARGETS),
                        help="comma-separated projection names of the decoder layers to adapt (vision tower excluded)")
    parser.add_argument("--lora-r", type=positive_int, default=64, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=64, help="LoRA scaling numerator (scale = alpha / r)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA inputs")
    parser.add_argument("--merge-lora", action="store_true", help="save the merged model (the adapter goes to OUTPUT/adapter)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for the LLM and the vision tower")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--fp16", action="store_true", help="fp16 mixed precision (GPU)")
    parser.add_argument("--max-slice-nums", type=positive_int, default=None, help="most tiles per image (default: the processor's)")
    parser.add_argument("--video-fps", type=positive_float, default=None,
                        help="video frames sampled per second (default: the processor's, 1)")
    parser.add_argument("--max-num-frames", type=positive_int, default=None,
                        help="most frames sampled from a video (default: the processor's, 64)")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="longest sample in tokens; longer ones are bad samples (never truncated through an image)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (overrides --epochs)")
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="learning-rate warmup: a fraction of the training steps (< 1) or a number of steps (>= 1)")
    parser.add_argument("--lr-scheduler", default="cosine", help="a transformers scheduler name")
    parser.add_argument("--batch-size", type=positive_int, default=1, help="per device (process)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    parser.add_argument("--optim", default="adamw_torch", help="a TrainingArguments optimizer name")
    parser.add_argument("--seed", type=int, default=42, help="model initialisation and data order")
    parser.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                        help="shuffle the data each epoch (seeded: the order is the same for any number of processes)")
    parser.add_argument("--bad-sample", choices=("skip", "stop"), default="skip",
                        help="a bad sample (missing image, placeholder/image mismatch ...) is skipped or stops the run")
    parser.add_argument("--logging-steps", type=positive_int, default=10, help="log the loss every N steps")
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    parser.add_argument("--save-dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="dtype of the saved weights (auto: as trained)")
    parser.add_argument("--generation-config", choices=("keep", "greedy", "sampling"), default="keep",
                        help="the saved generation_config.json: keep the base model's (a fresh model: the original "
                        "chat()'s sampling settings), greedy decoding, or the original's sampling settings")
    parser.add_argument("--greedy-generation-config", dest="generation_config", action="store_const", const="greedy",
                        help="the same as --generation-config greedy")
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager", "flash_attention_2"), default=None,
                        help="the decoder's attention (default: the folder's, sdpa)")
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config JSON (the README has ZeRO-2 and ZeRO-3 ones)")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimiser state over the processes (FSDP2, one unit per "
                        "decoder layer, EVA block and the resampler); run it with torchrun or accelerate launch")
    parser.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is available")
    parser.add_argument("--report-to", default="none", help="a Trainer report_to integration (tensorboard, wandb ...)")
    args = parser.parse_args(argv)
    args.lora_target_modules = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    if args.qlora:
        for flag, value in (("--merge-lora", args.merge_lora), ("--init-config", args.init_config),
                            ("--deepspeed", args.deepspeed), ("--fsdp", args.fsdp)):
            if value:
                parser.error(f"--qlora trains adapters on a 4-bit base: {flag} does not go with it (merge the adapter "
                             "into the full-precision model afterwards)")
        args.lora = True
    if args.merge_lora and not args.lora:
        parser.error("--merge-lora needs --lora")
    if args.fsdp and (args.cpu or not torch.accelerator.is_available()):
        parser.error("--fsdp needs GPUs (or other accelerators): accelerate shards only there; on CPUs use "
                     "torchrun without --fsdp (DDP)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import TrainingArguments, set_seed

    set_seed(args.seed)
    model, processor = load_model_and_processor(args)
    if processor.num_query != model.config.num_query:
        raise SystemExit(f"omnilmm-finetune: the processor makes {processor.num_query} image tokens per span, the model "
                         f"expects {model.config.num_query}")
    video_kwargs = {key: value for key, value in (("fps", args.video_fps), ("max_num_frames", args.max_num_frames))
                    if value is not None}
    dataset = SupervisedDataset(args.data, processor, args.max_slice_nums, args.max_length, args.bad_sample,
                                video_kwargs)
    say(f"{len(dataset)} training samples" + (f" ({len(dataset.skipped)} bad ones skipped)" if dataset.skipped else ""))
    if args.lora and args.init_config and is_main_process():  # the adapter needs its (random) base: keep it
        save_hub_folder(model, processor, Path(args.output) / "base_model")
    model = set_trainable(model, args)
    trainable, total = count_parameters(model)
    say(f"training {trainable:,} of {total:,} parameters")
    if args.gradient_checkpointing:
        inner = model.get_base_model() if args.lora else model
        inner.model.vision_tower.set_grad_checkpointing(True)

    training_args = TrainingArguments(
        output_dir=args.output,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        lr_scheduler_type=args.lr_scheduler,
        max_grad_norm=args.max_grad_norm,
        optim=args.optim,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=args.seed,
        data_seed=args.seed,
        train_sampling_strategy="random" if args.shuffle else "sequential",
        bf16=args.bf16,
        fp16=args.fp16,
        # without an accelerator, several processes (torchrun) only form one CPU (gloo) group when this is set
        use_cpu=args.cpu or not torch.accelerator.is_available(),
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        remove_unused_columns=False,
        # text-only steps run the vision side on one patch (see the model's forward); this keeps DDP safe when a
        # forward still leaves a parameter without a gradient
        ddp_find_unused_parameters=True,
        dataloader_num_workers=args.num_workers,
        deepspeed=args.deepspeed,
        fsdp="full_shard auto_wrap" if args.fsdp else None,
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": model._no_split_modules} if args.fsdp else None,
        report_to=args.report_to,
    )
    trainer = make_trainer_class()(model=model, args=training_args, train_dataset=dataset, data_collator=Collator(processor.tokenizer.pad_token_id))
    start = time.time()
    result = trainer.train()
    elapsed = time.time() - start
    say(f"trained {trainer.state.global_step} steps in {elapsed:.0f} s (train loss {result.training_loss:.4f})")
    save_outputs(trainer, trainer.accelerator.unwrap_model(trainer.model), processor, args)
    if trainer.is_world_process_zero():
        log = {"train_seconds": elapsed, "global_step": trainer.state.global_step, "skipped": dataset.skipped,
               "world_size": training_args.world_size, "fsdp": trainer.is_fsdp_enabled,
               "log_history": trainer.state.log_history}
        Path(args.output).mkdir(parents=True, exist_ok=True)
        (Path(args.output) / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    # All processes leave together, the process group shut down: a process that exits while another still saves
    # (ZeRO-3, FSDP) can abort in its communication threads ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
