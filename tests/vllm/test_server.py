"""A real `vllm serve` of the demo model on a loopback port, asked by the `openai` client: answers as
`model.chat(sampling=False)`, streams the same text, answers bad requests with a 4xx while it keeps serving, and
survives load and faults: 64 requests at once, a burst larger than its KV cache, clients that leave, 300 requests in
a row. The server runs the decoder over two tensor-parallel workers. Runs in `.venv-vllm`."""

import base64
import random
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from omnilmm_tools import clips
from omnilmm_tools.bench.serving import vllm_serve
from omnilmm_tools.vllm_check import png_data_url
from test_offline import shape_image

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo_model"
MAX_TOKENS = 8
QUESTION = "What colour is the shape?"


KV_BLOCKS = 20  # the server's KV cache, in blocks of 128 tokens (`--num-gpu-blocks-override`): a burst overflows it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` of the demo model over two tensor-parallel workers (one core each), with a KV cache a burst
    overflows and no multimodal cache (so that every request decodes and preprocesses its images)."""
    options = ["--dtype", "float32", "--max-model-len", "2048", "--gpu-memory-utilization", "0.15",
               "--allowed-local-media-path", str(ROOT / "assets"),
               "--trust-request-mm-kwargs",  # per-request mm_processor_kwargs (max_slice_nums)
               "--tensor-parallel-size", "2", "--distributed-executor-backend", "mp",
               "--num-gpu-blocks-override", str(KV_BLOCKS), "--mm-processor-cache-gb", "0"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    with vllm_serve(DEMO, log, *options, env=env) as (url, process):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        yield SimpleNamespace(client=client, process=process, metrics_url=f"{url}/metrics")


@pytest.fixture(scope="module")
def client(server):
    return server.client


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO, trust_remote_code=True, dtype=torch.float32).eval()


def ask(client, url, question=QUESTION, **kwargs):
    return client.chat.completions.create(model=str(DEMO), messages=[image_message(url, question)], temperature=0,
                                          **{"max_tokens": MAX_TOKENS, **kwargs})


def answer(client, url, question=QUESTION, **kwargs) -> str:
    return ask(client, url, question, **kwargs).choices[0].message.content.strip()


def test_an_image_question_answers_as_chat(client, model):
    sample = Image.open(ROOT / "assets" / "sample.png").convert("RGB")
    expected = model.chat(image=sample, msgs=[{"role": "user", "content": QUESTION}], sampling=False,
                          max_new_tokens=MAX_TOKENS)
    assert answer(client, png_data_url(sample)) == expected
    # an allowed local file is the same image
    assert answer(client, (ROOT / "assets" / "sample.png").as_uri()) == expected


def test_streaming_joins_to_the_same_text(client):
    url = png_data_url(shape_image((200, 160), (220, 30, 30), 1))
    pieces = [chunk.choices[0].delta.content or "" for chunk in ask(client, url, stream=True) if chunk.choices]
    assert len(pieces) > 1 and "".join(pieces).strip() == answer(client, url)


def test_max_slice_nums_per_request(client):
    """Fewer tiles per request (up to the server's own max_slice_nums) means fewer prompt tokens."""
    url = wide_url()
    sliced, unsliced = (ask(client, url, extra_body={"mm_processor_kwargs": {"max_slice_nums": n}}) for n in (4, 1))
    assert unsliced.usage.prompt_tokens < sliced.usage.prompt_tokens
    assert unsliced.choices[0].message.content


def huge_image_message():
    return [image_message(png_data_url(Image.new("RGB", (10_001, 10_001))))]  # 100.02 MP: over max_image_pixels (1e8)


def wide_url():
    return png_data_url(shape_image((900, 300), (30, 200, 30), 3))


def shape_video(folder, seed):
    """A clip of a moving shape (H.264 in mp4), as a base64 `data:` URL, and its file and shape."""
    frames, shape = clips.shape_frames(random.Random(seed), seconds=5, fps=6)
    path = clips.write_video(folder / f"shape-{seed}.mp4", frames, 6)
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode(), path, shape


def video_message(url, question=QUESTION):
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                        {"type": "text", "text": question}]}


def ask_video(client, url, **kwargs):
    return client.chat.completions.create(model=str(DEMO), messages=[video_message(url)], temperature=0,
                                          max_tokens=MAX_TOKENS, **kwargs)


def test_a_base64_video_answers_as_chat(client, model, tmp_path):
    for seed in (0, 1):
        url, path, shape = shape_video(tmp_path, seed)
        expected = model.chat(msgs=[{"role": "user", "content": [{"type": "video", "video": str(path)}, QUESTION]}],
                              sampling=False, max_new_tokens=MAX_TOKENS)
        assert ask_video(client, url).choices[0].message.content.strip() == expected == shape.colour


def test_video_sampling_per_request(client, tmp_path):
    """`media_io_kwargs` per request: a higher frame rate samples more frames, `max_num_frames` fewer."""
    url, _, _ = shape_video(tmp_path, 2)  # 5 s: 5 frames at the default 1 per second
    tokens = {name: ask_video(client, url, extra_body={"media_io_kwargs": {"video": settings}}).usage.prompt_tokens
              for name, settings in (("default", {}), ("fps 3", {"fps": 3}), ("2 frames", {"max_num_frames": 2}))}
    assert tokens["2 frames"] < tokens["default"] < tokens["fps 3"], tokens


NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"hello").decode()
NOT_A_VIDEO = "data:video/mp4;base64," + base64.b64encode(b"hello, not a video").decode()
BAD_REQUESTS = {  # name: (the request's arguments, built when the test runs; what the error message names)
    "corrupt base64": (lambda: dict(messages=[image_message("data:image/png;base64,iVBORw0KGgo!!!notbase64")]),
                       "base64"),
    "not an image": (lambda: dict(messages=[image_message(NOT_AN_IMAGE)]), "image"),
    "too many pixels": (lambda: dict(messages=huge_image_message()), "max_image_pixels"),
    "absurd max_slice_nums": (lambda: dict(messages=[image_message(wide_url())],
                                           extra_body={"mm_processor_kwargs": {"max_slice_nums": 10**9}}),
                              "max_slice_nums=1000000000 is more than this server allows"),
    "negative max_slice_nums": (lambda: dict(messages=[image_message(wide_url())],
                                             extra_body={"mm_processor_kwargs": {"max_slice_nums": -3}}),
                                "max_slice_nums must be an integer >= 1"),
    "more images than the context holds": (lambda: dict(messages=[{"role": "user", "content": [
        *[{"type": "image_url", "image_url": {"url": wide_url()}}] * 30, {"type": "text", "text": QUESTION}]}]),
        "maximum context length"),
    "literal image tokens": (lambda: dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": wide_url()}}, {"type": "text", "text": "<im_start><im_end>?"}]}]),
        "literal <im_start>/<im_patch>/<im_end> tokens"),
    "no messages": (lambda: dict(messages=[]), "empty conversation"),
    "not a video": (lambda: dict(messages=[video_message(NOT_A_VIDEO)]), "not a video file"),
    "an image as a video": (lambda: dict(messages=[video_message(png_data_url(Image.new("RGB", (64, 64))))]),
                            "is an image (png), not a video"),
    "video fps 0": (lambda: dict(messages=[video_message(data_url_of_clip())],
                                 extra_body={"media_io_kwargs": {"video": {"fps": 0}}}),
                    "fps must be a positive number"),
}


def data_url_of_clip():
    frames = [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(6)]
    with tempfile.TemporaryDirectory() as folder:
        path = clips.write_video(Path(folder) / "clip.mp4", frames, 3)
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(url, question=QUESTION):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_is_a_4xx_and_the_server_keeps_serving(client, case):
    request, named = BAD_REQUESTS[case]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=str(DEMO), max_tokens=MAX_TOKENS, **request())
    assert 400 <= caught.value.status_code < 500, (case, caught.value.status_code, caught.value.message)
    assert named in caught.value.message, caught.value.message
    sample = Image.open(ROOT / "assets" / "sample.png").convert("RGB")
    assert answer(client, png_data_url(sample))  # the next good request is answered


def test_the_web_demo_asks_the_server_and_gets_the_local_answer(client, model, tmp_path):
    """`omnilmm-demo --server`'s backend against this server: a picture and a video answer as the page's local
    backend (`chat(sampling=False)` on the same folder) does, streamed."""
    from omnilmm_tools import demo

    server = demo.RemoteServer(str(client.base_url))
    settings = {"max_slice_nums": 0, "sampling": False, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 8,
                "fps": 1, "max_num_frames": 64}
    _, video, _ = shape_video(tmp_path, 3)
    for part in ({"type": "image", "image": ROOT / "assets" / "sample.png"}, {"type": "video", "video": video}):
        msgs = [{"role": "user", "content": [part, QUESTION]}]
        pieces = list(server.answer(msgs, settings))  # streamed
        assert "".join(pieces).strip() == model.chat(msgs=msgs, sampling=False, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------------------------
# Load and faults
# ---------------------------------------------------------------------------------------------------------------

def metrics(server) -> dict:
    """The server's own Prometheus gauges and counters, summed over their labels; `cache_config_info`'s labels."""
    import urllib.request

    values = {}
    for line in urllib.request.urlopen(server.metrics_url, timeout=30).read().decode().splitlines():
        if line.startswith("vllm:cache_config_info{"):
            values["cache_config"] = dict(re.findall(r'(\w+)="([^"]*)"', line))
        elif line.startswith("vllm:") and not line.startswith("#"):
            name = line.split("{")[0].split()[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def wait_until_idle(server, timeout=120):
    """The server's running and waiting requests, once both are 0 (or what they are at the deadline)."""
    deadline = time.time() + timeout
    while True:
        now = metrics(server)
        busy = now.get("vllm:num_requests_running", 0), now.get("vllm:num_requests_waiting", 0)
        if busy == (0, 0) or time.time() > deadline:
            return busy
        time.sleep(0.5)


def resident_bytes(process) -> int:
    """RSS of the server and its workers (the engine core, the tensor-parallel workers)."""
    import psutil

    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())


def mixed_requests(count):
    """`count` different requests: images of several sizes, sliced ones, two images, text only; every other one
    streamed."""
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30)]
    requests = []
    for i in range(count):
        kind = ("image", "sliced", "two images", "text")[i % 4]
        image = png_data_url(shape_image((160 + 10 * i, 120 + 5 * i), colours[i % 4], i))
        urls = {"image": [image], "sliced": [png_data_url(shape_image((900 + 10 * i, 300), colours[i % 4], i))],
                "two images": [image, png_data_url(shape_image((200, 200), colours[(i + 1) % 4], 100 + i))],
                "text": []}[kind]
        content = [*({"type": "image_url", "image_url": {"url": url}} for url in urls),
                   {"type": "text", "text": QUESTION if i % 3 else "Describe the picture."}]
        requests.append(({"role": "user", "content": content}, i % 2 == 1))
    return requests


def complete(client, request, max_tokens=MAX_TOKENS):
    """(the answer, its prompt tokens, its latency in seconds), streamed or not."""
    message, stream = request
    started = time.perf_counter()
    response = client.chat.completions.create(model=str(DEMO), messages=[message], temperature=0,
                                              max_tokens=max_tokens, stream=stream,
                                              **({"stream_options": {"include_usage": True}} if stream else {}))
    if stream:
        text, usage = "", None
        for chunk in response:
            text += "".join(choice.delta.content or "" for choice in chunk.choices)
            usage = chunk.usage or usage
    else:
        text, usage = response.choices[0].message.content, response.usage
    return text.strip(), usage.prompt_tokens, time.perf_counter() - started


def percentile(values, q):
    return float(np.percentile(values, q))


def test_sixty_four_concurrent_mixed_requests_each_answer_as_alone(server):
    """64 different requests at once (images of several sizes, sliced, two images, text only; streamed and not):
    every answer equals the same request's answer alone."""
    client, requests = server.client, mixed_requests(64)
    alone = [complete(client, request) for request in requests]
    started = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: complete(client, request), requests))
    seconds = time.perf_counter() - started
    assert [answer for answer, _, _ in together] == [answer for answer, _, _ in alone]
    latencies = [latency for _, _, latency in together]
    print(f"64 at once: p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
          f"{len(requests) / seconds:.1f} requests/s; one at a time: p50 {percentile([a[2] for a in alone], 50):.2f} s")


def test_a_burst_larger_than_the_kv_cache_queues_instead_of_failing(server):
    """48 requests of 48 new tokens each at once, more than twice the tokens the server's KV cache holds: they wait
    their turn (the server's waiting gauge rises, or it preempts), all finish with their 48 tokens, and those
    compared answer as they do alone."""
    client, requests = server.client, mixed_requests(48)
    new_tokens = 48

    def generate(request):
        message, _ = request
        response = client.chat.completions.create(model=str(DEMO), messages=[message], temperature=0,
                                                  max_tokens=new_tokens, extra_body={"ignore_eos": True})
        return response.choices[0].message.content, response.usage

    now = metrics(server)
    capacity = int(now["cache_config"]["num_gpu_blocks"]) * int(now["cache_config"]["block_size"])
    before = now.get("vllm:num_preemptions_total", 0)
    waiting, done = [], threading.Event()

    def watch():
        while not done.is_set():
            waiting.append(metrics(server).get("vllm:num_requests_waiting", 0))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            burst = list(pool.map(generate, requests))
    finally:
        done.set()
        watcher.join()
    assert sum(usage.total_tokens for _, usage in burst) > 2 * capacity  # (else it proves nothing)
    assert all(usage.completion_tokens == new_tokens for _, usage in burst)
    preempted = metrics(server).get("vllm:num_preemptions_total", 0) - before
    assert max(waiting) > 0 or preempted > 0, "nothing waited: the KV cache held the whole burst"
    assert [generate(request)[0] for request in requests[:4]] == [text for text, _ in burst[:4]]
    print(f"KV cache {capacity} tokens; the burst {sum(u.total_tokens for _, u in burst)} tokens: up to "
          f"{max(waiting):.0f} requests waiting, {preempted:.0f} preempted")


def test_disconnects_and_cancelled_requests_leave_nothing_running(server):
    """Clients that close a stream after its first piece, and requests abandoned while the server still decodes and
    slices their large image: the server ends them all (its own gauges read 0 running, 0 waiting) and answers the
    next request as before."""
    client = server.client
    expected = answer(client, wide_url())
    for _ in range(6):
        stream = client.chat.completions.create(model=str(DEMO), messages=[image_message(wide_url())],
                                                temperature=0, max_tokens=200, stream=True)
        next(iter(stream))
        stream.close()
    large = png_data_url(shape_image((4000, 3000), (30, 200, 30), 5))
    # a client of its own, with no idle keep-alive connection in its pool: the server closes those after 5 s, and
    # reusing one as it closes fails with "Server disconnected" before the request is even sent
    impatient = openai.OpenAI(base_url=client.base_url, api_key="none", max_retries=0, timeout=0.3)
    for _ in range(4):
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(model=str(DEMO), messages=[image_message(large)], max_tokens=200)
    assert wait_until_idle(server) == (0, 0)
    assert answer(client, wide_url()) == expected


def test_three_hundred_requests_in_a_row_keep_memory_flat(server):
    """Each with a new image (no multimodal cache): the server's memory (all its processes) grows by less than
    64 MB from the 50th request to the 300th."""
    client, colours = server.client, [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    rss = {}
    for i in range(300):
        url = png_data_url(shape_image((200 + i % 50, 150 + i % 40), colours[i % 3], 1000 + i))
        assert answer(client, url, max_tokens=2)
        if i + 1 in (50, 300):
            rss[i + 1] = resident_bytes(server.process)
    growth = rss[300] - rss[50]
    print(f"server RSS after 50 requests {rss[50] / 1e9:.2f} GB, after 300 {rss[300] / 1e9:.2f} GB "
          f"({growth / 1e6:+.0f} MB)")
    assert growth < 64e6
