"""The web demo (`omnilmm-demo`, Gradio) in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright, on the shipped demo model. Upload a picture, ask, get `chat(sampling=False)`'s answer, ask a follow-up;
a file that is not a picture is answered with an error and the page keeps working; two browser sessions keep their
own conversations (one about a picture, one about a video); Gradio's own client gets the same answers.

Set OMNILMM_SCREENSHOT=path to keep the screenshot of the page answering (the README's `docs/web_demo.png`).
"""

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from omnilmm_tools.cli import free_port
from omnilmm_tools import demo
from omnilmm_tools.bench.demo import CHROMIUM_ARGS
from omnilmm_tools.remote import DEMO_MODEL, ROOT

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
SAMPLE, VIDEO = ROOT / "assets" / "sample.png", ROOT / "assets" / "sample.mp4"


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def page_url():
    app = demo.build_app(demo.LocalModel(DEMO_MODEL, device="cpu"), max_slice_nums=4)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1000, "height": 760}).new_page()
    page.goto(url)
    page.wait_for_selector("textarea", timeout=60_000)
    return page


def answers(page) -> list[str]:
    """The page's finished answers, in order: an answer's text once its stats line is shown, or an error."""
    texts = [text.strip() for text in page.locator("[data-testid=bot]").all_inner_texts()]
    done = []
    for i, text in enumerate(texts):
        if text.startswith(demo.ERROR):
            done.append(text)
        elif i + 1 < len(texts) and " tokens/s" in texts[i + 1] and " tokens/s" not in text:
            done.append(text)
    return done


def ask(page, question, files=(), timeout=120):
    """Type `question` (with `files` attached) into the page, send it, and wait for its answer."""
    before = len(answers(page))
    if files:
        page.locator("input[type=file]").first.set_input_files([str(path) for path in files])
        page.wait_for_timeout(500)
    box = page.locator("textarea").first
    box.fill(question)
    box.press("Enter")
    deadline = time.time() + timeout
    while len(answers(page)) <= before:
        assert time.time() < deadline, f"no answer to {question!r} in {timeout} s"
        page.wait_for_timeout(200)
    return answers(page)[-1]


def greedy(model, msgs):
    return model.chat(msgs=msgs, sampling=False, max_new_tokens=256)


def test_a_picture_question_and_a_follow_up_answer_as_chat(browser, page_url, model, tmp_path):
    page = open_page(browser, page_url)
    first = [{"role": "user", "content": [{"type": "image", "image": SAMPLE}, "What colour is the shape?"]}]
    expected = greedy(model, first)
    assert ask(page, "What colour is the shape?", [SAMPLE]) == expected
    page.screenshot(path=os.environ.get("OMNILMM_SCREENSHOT") or str(tmp_path / "page.png"))
    follow_up = first + [{"role": "assistant", "content": expected}, {"role": "user", "content": "What shape is it?"}]
    assert ask(page, "What shape is it?") == greedy(model, follow_up)  # the picture stays in the conversation
    stats = [text for text in page.locator("[data-testid=bot]").all_inner_texts() if "tokens/s" in text]
    assert len(stats) == 2 and all(" in " in line and "first token after" in line for line in stats)
    page.context.close()


def test_a_file_that_is_not_a_picture_gets_an_error_and_the_page_keeps_working(browser, page_url, model, tmp_path):
    page = open_page(browser, page_url)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    assert ask(page, "What is this?", [notes]) == f"{demo.ERROR}notes.txt is neither a picture nor a video: upload " \
                                                 "an image or a video file."
    error = ask(page, "And this?", [broken])
    assert error.startswith(demo.ERROR) and "broken.png" in error and "not an image" in error
    expected = greedy(model, [{"role": "user", "content": [{"type": "image", "image": SAMPLE},
                                                           "What colour is the shape?"]}])
    assert ask(page, "What colour is the shape?", [SAMPLE]) == expected  # the failed turns are not in the way
    page.context.close()


def test_two_sessions_keep_their_own_conversations(browser, page_url, model):
    picture, video = open_page(browser, page_url), open_page(browser, page_url)
    assert ask(picture, "What colour is the shape?", [SAMPLE]) == greedy(model, [{"role": "user", "content": [
        {"type": "image", "image": SAMPLE}, "What colour is the shape?"]}])
    asked = [{"role": "user", "content": [{"type": "video", "video": VIDEO}, "What colour is the moving shape?"]}]
    assert ask(video, "What colour is the moving shape?", [VIDEO]) == greedy(model, asked)
    kinds = ask(picture, "What shape is it?"), ask(video, "What shape is it?")
    assert kinds[0] != kinds[1]  # each about its own picture or video (a square, a triangle)
    assert kinds[1] == greedy(model, asked + [{"role": "assistant", "content": answers(video)[0]},
                                              {"role": "user", "content": "What shape is it?"}])
    picture.context.close()
    video.context.close()


def test_gradio_client_gets_the_same_answer(page_url, model):
    from gradio_client import Client, handle_file

    client = Client(page_url + "/", verbose=False)
    defaults = [0, False, 0.6, 0.9, 256, 1, 64]  # the page's settings, as shown
    reply = client.predict({"text": "What colour is the shape?", "files": [handle_file(str(SAMPLE))]}, *defaults,
                           api_name="/chat")
    expected = greedy(model, [{"role": "user", "content": [{"type": "image", "image": SAMPLE},
                                                           "What colour is the shape?"]}])
    assert reply[0] == expected and "tokens/s" in reply[1]["metadata"]["title"]


def test_page_settings_reach_the_model(page_url, model):
    """Sampling, answer length and video frames set on the page are what `chat()` is given (through the API)."""
    from gradio_client import Client, handle_file

    client = Client(page_url + "/", verbose=False)
    reply = client.predict({"text": "Describe the video.", "files": [handle_file(str(VIDEO))]}, 0, False, 0.6, 0.9,
                           1, 2, 3, api_name="/chat")
    asked = [{"role": "user", "content": [{"type": "video", "video": VIDEO}, "Describe the video."]}]
    expected = model.chat(msgs=asked, sampling=False, max_new_tokens=1, fps=2, max_num_frames=3)
    assert reply[0] == expected and reply[1]["metadata"]["title"].startswith("1 token in ")


def test_model_messages_keep_pictures_and_drop_failed_turns():
    files = {"type": "file", "file": {"path": str(SAMPLE)}}
    history = [{"role": "user", "content": [files, {"type": "text", "text": "Colour?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "orange"}]},
               {"role": "assistant", "content": "", "metadata": {"title": "1 token in 0.1 s"}},
               {"role": "user", "content": [{"type": "text", "text": "Broken?"}]},
               {"role": "assistant", "content": f"{demo.ERROR}the model failed"}]
    msgs = demo.model_messages(history, {"text": "Shape?", "files": []})
    assert msgs == [{"role": "user", "content": [{"type": "image", "image": Path(SAMPLE)}, "Colour?"]},
                    {"role": "assistant", "content": "orange"}, {"role": "user", "content": ["Shape?"]}]


def test_the_bench_times_the_page_against_chat(tmp_path):
    """`omnilmm-bench --only demo` (comparison 10) runs the page in the browser and prints its two rows."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "omnilmm_tools.bench", "--smoke", "--only", "demo", "--workdir",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    output = result.stdout
    assert result.returncode == 0, result.stderr
    rows = [line for line in output.splitlines() if line.startswith("  10 web demo")]
    assert len(rows) == 2 and "last token on the page / chat()" in rows[0] and "first token" in rows[1], output
