"""Comparison 10 of `omnilmm-bench`: the web demo (`omnilmm-demo`, local backend) in a real browser against `chat()`
called directly on the same question: the time from pressing Enter to the answer's last token shown on the page, and
to its first token shown. Needs Gradio (`omnilmm-hf[demo]`), Playwright and Debian's chromium; without them it says so
and is left out.

The model is the bench's random one saved as a folder, greedy, made to answer `new_tokens` tokens (its generation
config's `min_new_tokens`): a page adds a fixed cost per answer, which only an answer of a real length puts in
proportion. The page is read every 50 ms. On a CPU both contenders run the model on all cores but one, which the
browser and the page's server use (measured on 2 cores: sharing every core with the model made the page 1.45x, one
core left to them 1.13x; a browser usually runs on its user's own machine).
"""

import contextlib
import shutil
import socket
import time

import torch

from .common import build_processor, fmt_s, header, median, omnilmm_config, random_model, synthetic_photo
from .video import optional

QUESTION = "What is in the picture?"
# Headless, and nothing that would reach the network (closed here: refused connections slow every start).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def bench_demo(bench, workdir):
    from ..finetune import save_hub_folder

    header("10. Web demo: an answer through the page (local backend, headless Chromium) vs chat() called directly")
    chromium = shutil.which("chromium")
    if not (optional("gradio") and optional("playwright.sync_api") and chromium):
        print('  (left out: needs `pip install "omnilmm-hf[demo]" playwright` and Debian\'s chromium)')
        return
    from .. import demo

    new_tokens, reps = bench.preset["new_tokens"]["demo"], bench.preset["reps"]["demo"]
    folder = workdir / "demo"
    model = random_model(omnilmm_config(bench.preset["model"]), torch.device("cpu"), torch.float32)
    save_hub_folder(model, build_processor(slice_mode=False), folder)
    del model
    config = (folder / "generation_config.json")
    config.write_text(config.read_text().replace('"do_sample": false', f'"do_sample": false, "min_new_tokens": '
                                                                       f'{new_tokens}'))
    photo = workdir / "photo.png"
    synthetic_photo(640, 480).save(photo)
    backend = demo.LocalModel(folder, device=str(bench.device))
    msgs = [{"role": "user", "content": [{"type": "image", "image": photo}, QUESTION]}]
    settings = dict(max_new_tokens=new_tokens, sampling=False)  # (the page's, set by build_app below)

    def direct():
        start, first = time.perf_counter(), None
        for _ in backend.model.chat(msgs=msgs, processor=backend.processor, stream=True, **settings):
            first = first or time.perf_counter() - start
        return first, time.perf_counter() - start

    times, threads = {"direct": [], "page": []}, torch.get_num_threads()
    if bench.device.type == "cpu":
        torch.set_num_threads(max(1, threads - 1))
    with browser_pages(demo.build_app(backend, max_new_tokens=new_tokens)) as new_page:
        for rep in range(reps + 1):  # (the first: warm-up)
            backend.model.clear_chat_cache()
            direct_times = direct()
            backend.model.clear_chat_cache()
            page_times = through_page(new_page(), photo)
            if rep:
                times["direct"].append(direct_times)
                times["page"].append(page_times)
    model_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    last = median([p[1] / d[1] for p, d in zip(times["page"], times["direct"])])
    first = max(0.0, median([p[0] - d[0] for p, d in zip(times["page"], times["direct"])]))  # (0: as soon)
    direct_last, page_last = (median([t[1] for t in times[k]]) for k in ("direct", "page"))
    bench.add("10 web demo", f"answer of {new_tokens} tokens, last token on the page / chat()", last, "<= 1.20",
              f"page {fmt_s(page_last)}, chat() {fmt_s(direct_last)}; the model on {model_threads} of "
              f"{threads} threads")
    bench.add("10 web demo", "first token on the page, seconds after chat()'s first token", first, "<= 1.00",
              f"first token: page {fmt_s(median([t[0] for t in times['page']]))}, chat() "
              f"{fmt_s(median([t[0] for t in times['direct']]))}")


@contextlib.contextmanager
def browser_pages(app):
    """`app` served on a free port of 127.0.0.1 and headless Chromium: yields a function that opens a new page."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)

            def new_page():
                page = browser.new_context().new_page()
                page.goto(f"http://127.0.0.1:{port}")
                page.wait_for_selector("textarea", timeout=60_000)
                return page

            yield new_page
            browser.close()
    finally:
        app.close()


def through_page(page, photo):
    """Ask on a new page, as a user does: (seconds to the first text shown, to the answer done)."""
    page.locator("input[type=file]").first.set_input_files(str(photo))
    page.wait_for_timeout(300)
    box = page.locator("textarea").first
    box.fill(QUESTION)
    bots = page.locator("[data-testid=bot]")
    start, first = time.perf_counter(), None
    box.press("Enter")
    while True:
        texts = bots.all_inner_texts()
        if first is None and texts and texts[0].strip():
            first = time.perf_counter() - start
        if any("tokens/s" in text for text in texts):
            done = time.perf_counter() - start
            page.context.close()
            return first or done, done
        page.wait_for_timeout(50)
