"""`omnilmm-demo`: a web page to chat with an OmniLMM model about pictures and videos (Gradio).

    omnilmm-demo                                   # the demo model that comes with this package, on this machine
    omnilmm-demo --model /path/to/omnilmm-12b-hf   # a converted folder
    omnilmm-demo --server http://host:8000/v1      # an OpenAI-compatible server (`vllm serve` with the plugin)

The page is served on 127.0.0.1:7860 (`--host 0.0.0.0` to open it to the network; `--share` for a public Gradio link).
Drop in pictures or a video, ask, watch the answer stream; earlier pictures stay in the conversation. Settings: tiles
per image, greedy or sampling, answer length, and a video's frame rate and frame count.
"""

import base64
import mimetypes
import threading
import time
from pathlib import Path

from .cli import Parser, fail, positive_int, torch_device
from .remote import DEMO_MODEL, ROOT

ERROR = "Error: "  # an answer that is an error message starts with it (and is left out of later turns)
UPDATE_EVERY = 0.1  # seconds between two updates of a streaming answer on the page
EXAMPLES = [(ROOT / "assets" / "sample.png", "What colour is the shape?"), (ROOT / "assets" / "sample.mp4",
                                                                            "What colour is the moving shape?")]


def kind_of(path) -> str:
    """"image" or "video", from the file's name; a `ValueError` for anything else."""
    mime = mimetypes.guess_type(str(path))[0] or ""
    if mime.startswith(("image/", "video/")):
        return mime.split("/")[0]
    raise ValueError(f"{Path(path).name} is neither a picture nor a video: upload an image or a video file.")


def model_messages(history: list[dict], message: dict) -> list[dict]:
    """The page's conversation (Gradio's messages, their content blocks of texts and files; each answer followed by
    its stats line) and the new `{"text", "files"}` message → `chat()`'s messages. A turn that ended in an error is
    left out, question included."""
    new = [*({"type": "file", "file": {"path": path}} for path in message.get("files", [])),
           {"type": "text", "text": message.get("text", "")}]
    turns, pending = [], []
    for entry in [*history, {"role": "user", "content": new}]:
        blocks = entry["content"] if isinstance(entry["content"], list) else [entry["content"]]
        if entry["role"] == "user":
            pending += blocks
            continue
        text = "".join(block.get("text", "") if isinstance(block, dict) else str(block) for block in blocks)
        if text.startswith(ERROR):
            pending = []  # the failed question goes with its error
        elif not (entry.get("metadata") or {}).get("title"):  # (not a stats line)
            turns += [{"role": "user", "content": parts(pending)}, {"role": "assistant", "content": text}]
            pending = []
    return turns + [{"role": "user", "content": parts(pending)}]


def parts(blocks) -> list:
    """A user turn's content blocks (texts, files) → content parts for `chat()` (files as image / video parts)."""
    out = []
    for block in blocks:
        block = {"type": "text", "text": block} if isinstance(block, str) else block
        if block.get("type") == "file" or "path" in block:
            path = Path((block.get("file") or block)["path"])
            kind = kind_of(path)
            out.append({"type": kind, kind: path})
        elif block.get("text", "").strip():
            out.append(block["text"])
    return out


class LocalModel:
    """A converted folder on this machine, one model for every browser session, one answer at a time."""

    def __init__(self, folder, device=None, timeout=120.0):
        import torch
        from transformers import AutoModelForCausalLM, AutoProcessor

        from .cli import load_dtype
        from .cpu_decoding import block_lm_head

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                          dtype=load_dtype(folder, device)).to(device)
        self.model.eval()
        block_lm_head(self.model)
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        self.name, self.timeout, self.lock = Path(folder).name, timeout, threading.Lock()

    def answer(self, msgs, settings: dict):
        """The answer's text pieces as they come, and its token count as the generator's return value."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = threading.Event()

        class Stopped(StoppingCriteria):  # the page's stop button, or a closed page, ends generation
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        with self.lock:
            kwargs = video_and_decoding(settings)
            pieces = self.model.chat(msgs=msgs, processor=self.processor, stream=True, max_time=self.timeout,
                                     stopping_criteria=StoppingCriteriaList([Stopped()]), **kwargs)
            text = ""
            try:
                for piece in pieces:
                    text += piece
                    yield piece
            finally:
                stop.set()
                for _ in pieces:  # (the generation thread ends at its next step)
                    pass
        return len(self.processor.tokenizer(text.strip(), add_special_tokens=False)["input_ids"])


def video_and_decoding(settings: dict) -> dict:
    """The page's settings as `chat()` keywords."""
    kwargs = {"max_new_tokens": settings["max_new_tokens"], "sampling": settings["sampling"],
              "fps": settings["fps"], "max_num_frames": settings["max_num_frames"]}
    if settings["max_slice_nums"]:
        kwargs["max_slice_nums"] = settings["max_slice_nums"]
    if settings["sampling"]:
        kwargs.update(temperature=settings["temperature"], top_p=settings["top_p"])
    return kwargs


class RemoteServer:
    """An OpenAI-compatible server (`vllm serve` of an OmniLMM folder): pictures and videos go as `data:` URLs, the
    answer streams back. vLLM batches the requests of every browser session."""

    def __init__(self, url: str, model: str | None = None, timeout=120.0):
        import httpx

        self.client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        self.name = model or self.client.get("/models").raise_for_status().json()["data"][0]["id"]

    def answer(self, msgs, settings: dict):
        import json

        body = {"model": self.name, "messages": [openai_message(m) for m in msgs], "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": settings["max_new_tokens"],
                "temperature": settings["temperature"] if settings["sampling"] else 0.0,
                "media_io_kwargs": {"video": {"fps": settings["fps"], "max_num_frames": settings["max_num_frames"]}}}
        if settings["sampling"]:
            body["top_p"] = settings["top_p"]
        if settings["max_slice_nums"]:  # (the server takes it with --trust-request-mm-kwargs)
            body["mm_processor_kwargs"] = {"max_slice_nums": settings["max_slice_nums"]}
        tokens = 0
        with self.client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ValueError(server_error(response))
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        yield choice["delta"]["content"]
        return tokens


def server_error(response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"the server answered {response.status_code}: {response.text[:300]}"


def openai_message(message: dict) -> dict:
    """A `chat()` message → the OpenAI format, files as `data:` URLs."""
    if isinstance(message["content"], str):
        return message
    content = []
    for part in message["content"]:
        if isinstance(part, str):
            content.append({"type": "text", "text": part})
            continue
        kind = part["type"]
        mime = mimetypes.guess_type(str(part[kind]))[0]
        url = f"data:{mime};base64," + base64.b64encode(Path(part[kind]).read_bytes()).decode()
        content.append({"type": f"{kind}_url", f"{kind}_url": {"url": url}})
    return {"role": message["role"], "content": content}


def respond(backend, message, history, *settings):
    """The page's chat function: stream the answer, then a line with its token count and speed; errors (a file that
    is not a picture or a video, a corrupt picture, a model or server error) are answers of their own."""
    import gradio as gr

    settings = dict(zip(SETTINGS, settings))
    start, text, first, shown = time.perf_counter(), "", None, 0.0
    try:
        pieces = backend.answer(model_messages(history, message), settings)
        while True:
            try:
                text += next(pieces)
            except StopIteration as done:
                tokens = done.value
                break
            first = first or time.perf_counter()
            if time.perf_counter() - shown >= UPDATE_EVERY:  # (each update re-renders the page: not every token)
                shown = time.perf_counter()
                yield text
    except Exception as error:  # noqa: BLE001 - shown in the page, which keeps working
        yield f"{ERROR}{str(error) or type(error).__name__}"
        return
    seconds = time.perf_counter() - start
    stats = f"{tokens} token{'s' * (tokens != 1)} in {seconds:.1f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s"
    if first is not None:
        stats += f", first token after {first - start:.2f} s"
    yield [text.strip(), gr.ChatMessage(content="", metadata={"title": stats})]


SETTINGS = ("max_slice_nums", "sampling", "temperature", "top_p", "max_new_tokens", "fps", "max_num_frames")


def build_app(backend, max_slice_nums: int = 9, concurrency: int = 1, max_new_tokens: int = 256):
    """The page (a Gradio `ChatInterface`, its API `/chat` included) in front of `backend`."""
    import gradio as gr

    settings = [
        gr.Slider(0, max_slice_nums, value=0, step=1, label="Tiles per image (max_slice_nums; 0: the model's)"),
        gr.Checkbox(value=False, label="Sample (else greedy)"),
        gr.Slider(0.1, 1.5, value=0.6, step=0.05, label="Temperature (sampling)"),
        gr.Slider(0.1, 1.0, value=0.9, step=0.05, label="Top-p (sampling)"),
        gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Most new tokens"),
        gr.Slider(0.1, 10, value=1, step=0.1, label="Video: frames per second sampled"),
        gr.Slider(1, 128, value=64, step=1, label="Video: most frames"),
    ]
    defaults = [component.value for component in settings]
    examples = [[{"text": question, "files": [str(path)]}, *defaults] for path, question in EXAMPLES if path.is_file()]

    def chat(message, history, *values):
        yield from respond(backend, message, history, *values)

    return gr.ChatInterface(
        chat, multimodal=True, title="OmniLMM", description=f"Model: `{backend.name}`. Drop in pictures or a video, "
        "then ask about them.", additional_inputs=settings, additional_inputs_accordion="Settings",
        examples=examples, run_examples_on_click=False, concurrency_limit=concurrency, api_name="chat",
        textbox=gr.MultimodalTextbox(file_count="multiple",  # (any file: one that is not media is answered)
                                     placeholder="Ask about a picture or a video", sources=["upload"]),
    )


def main(argv=None) -> None:
    parser = Parser("omnilmm-demo", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="a converted folder (default: the demo model)")
    parser.add_argument("--server", help="an OpenAI-compatible server's URL (e.g. http://localhost:8000/v1) instead")
    parser.add_argument("--device", type=torch_device, default=None, help="for --model: cpu, cuda, ...")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve the page on")
    parser.add_argument("--port", type=positive_int, default=7860)
    parser.add_argument("--share", action="store_true", help="also a public link through Gradio's servers")
    parser.add_argument("--max-file-size", default="200mb", help="the largest upload")
    parser.add_argument("--timeout", type=positive_int, default=120, help="seconds an answer may take")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256, help="the page's answer length")
    parser.add_argument("--concurrency", type=positive_int, default=None,
                        help="answers at once (default: 1 for --model, 8 for --server, which batches them)")
    args = parser.parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail(parser.prog, 'the web demo needs Gradio: pip install "omnilmm-hf[demo]"')
    if args.server:
        backend, concurrency = RemoteServer(args.server, timeout=args.timeout), args.concurrency or 8
    else:
        if not (Path(args.model) / "config.json").is_file():
            fail(parser.prog, f"{args.model} is not a model folder (it has no config.json)")
        backend, concurrency = LocalModel(args.model, args.device, args.timeout), args.concurrency or 1
    slices = getattr(getattr(backend, "processor", None), "image_processor", None)
    app = build_app(backend, getattr(slices, "max_slice_nums", 9), concurrency, args.max_new_tokens)
    app.queue(max_size=64).launch(server_name=args.host, server_port=args.port, share=args.share,
                                  max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
