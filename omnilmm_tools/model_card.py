"""Model cards (`README.md`) for the folders the tools write: a converted release and the demo model."""

import re
from importlib import metadata
from pathlib import Path

LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt")
UNKNOWN_LICENCE = ("The source folder states no licence (no `license:` in its README.md, no LICENSE file): the terms "
                   "of the original release apply; check them before sharing these weights.")

USAGE = '''```python
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

path = "{path}"  # this folder, or its Hub repository
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto")
answer = model.chat(image="photo.jpg", msgs=[{{"role": "user", "content": "What is in the picture?"}}], sampling=False)

# or with the processor and generate
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is this?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=["photo.jpg"], text=[prompt], return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.post_process_image_text_to_text(output[:, inputs["input_ids"].shape[1]:])[0])

# or as a pipeline
pipe = pipeline("image-text-to-text", model=path, trust_remote_code=True)
```'''


def front_matter(licence: str, tags=("omnilmm", "vision-language", "custom_code")) -> str:
    tag_lines = "".join(f"  - {tag}\n" for tag in tags)
    return (f"---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\nlicense: {licence}\n"
            f"tags:\n{tag_lines}---\n")


def source_licence(src: Path) -> tuple[str, str]:
    """`(YAML licence id, a sentence for the card)` as the source folder states it: the `license:` of its README's
    front matter, else the first line of a LICENSE file, else unknown (`other`)."""
    readme = src / "README.md"
    if readme.is_file():
        match = re.match(r"---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        licence = re.search(r"^license:\s*(\S+)", match.group(1), re.M) if match else None
        if licence:
            value = licence.group(1).strip("'\"")
            return value, f"`{value}`, as the source folder's model card states it."
    for name in LICENCE_FILES:
        if (src / name).is_file():
            first = next((line.strip() for line in (src / name).read_text(errors="replace").splitlines()
                          if line.strip()), "")
            return "other", f"The source folder's {name} (copied here): \"{first}\"."
    return "other", UNKNOWN_LICENCE


def package_version() -> str:
    try:
        return metadata.version("omnilmm-hf")
    except metadata.PackageNotFoundError:
        return "a source checkout"


def converted_model_card(config, src: Path) -> str:
    """The card of a folder `omnilmm-convert` wrote from the original-format folder `src`."""
    import transformers

    licence, licence_text = source_licence(src)
    vision = config.mm_vision_tower + (f" with {config.vision_tower_kwargs}" if config.vision_tower_kwargs else "")
    return f"""{front_matter(licence)}
# {src.name} (OmniLMM for Transformers)

OmniLMM, a vision-language model: an EVA02 vision transformer (timm `{vision}`) reads each image (or, with
MiniCPM-V slicing, an overview and its tiles), a Perceiver resampler turns its patch features into {config.num_query}
query tokens, and those take the place of the `<im_patch>` tokens of the prompt in a Mistral decoder
({config.num_hidden_layers} layers, hidden size {config.hidden_size}, {config.vocab_size} tokens). The model code is
this folder's remote code (`trust_remote_code=True`); the weights are the original release's, renamed only.

## Use

{USAGE.format(path=src.name + "-hf")}

## Licence

{licence_text}

## Converted with

`omnilmm-convert` (omnilmm-hf, {package_version()}) from the original-format folder `{src.name}`, with transformers
{transformers.__version__}. Tensors keep their values and dtype; `generation_config.json` holds the original `chat()`'s
sampling settings.
"""


def demo_model_card(config) -> str:
    """The card of `demo_model/`, the tiny OmniLMM this project trains from scratch on the shapes task."""
    return f"""{front_matter("apache-2.0", ("omnilmm", "vision-language", "custom_code", "demo"))}
# OmniLMM demo model (shapes)

A tiny OmniLMM ({config.num_hidden_layers} decoder layers, hidden size {config.hidden_size}, a small EVA02 tower,
{config.num_query} query tokens per image, MiniCPM-V slicing on) trained from scratch on CPU by the omnilmm-hf
project (`scripts/train_demo.sh`) on synthetic pictures of one to three coloured shapes. It answers questions about the
colour, shape, position and number of the shapes in such pictures, nothing else: a model to try the code with, not a
model of the world. Its vocabulary is Mistral v0.1's with OmniLMM's 9 added tokens.

## Use

{USAGE.format(path="demo_model")}

From the command line: `omnilmm-chat --image picture.png "What colour is the shape?"`.

## Licence

Apache-2.0: weights trained by the omnilmm-hf project on its own generated data; the tokenizer is Mistral v0.1's
(Apache-2.0).
"""
