"""One conversation asked of `transformers` and of vLLM's offline engine, greedily, for comparing their prompt ids
and tokens (`tests/vllm`, `scripts/gpu_check.py`). A conversation's content is a list of PIL images and strings.
`png_data_url` writes a picture as a client of `vllm serve` sends it (the server tests, the bench's load rows)."""

import base64
import io

from PIL import Image


def png_data_url(image: Image.Image) -> str:
    """`image` as a PNG `data:` URL, as a client of `vllm serve` sends a picture."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def hf_greedy(model, processor, content, max_new_tokens):
    """`transformers`' prompt ids, greedy new tokens (EOS dropped) and processor outputs for one user message."""
    images = [part for part in content if isinstance(part, Image.Image)]
    parts = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in content]
    prompt = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    return inputs["input_ids"][0].tolist(), [t for t in new if t != processor.tokenizer.eos_token_id], inputs


def vllm_messages(content):
    """The same user message as `LLM.chat` takes it (images as PIL parts)."""
    parts = [{"type": "image_pil", "image_pil": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
             for p in content]
    return [{"role": "user", "content": parts}]


def greedy(llm, max_tokens):
    """The folder's generation settings (its repetition penalty, as `chat(sampling=False)` keeps it), greedy."""
    params = llm.get_default_sampling_params()
    params.temperature, params.max_tokens = 0.0, max_tokens
    return params
