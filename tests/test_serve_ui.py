"""The Gradio chat (mmlm/serve/ui.py): the history -> conversation conversion for Gradio 5 and 6,
the streaming chat function on a real engine (cancelled when closed, errors shown), the shapes
examples, and the whole UI in a headless Chromium (upload an image, ask, see the model's answer,
ask again with the image still in the conversation)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmlm.config import parse_config
from mmlm.model import build
from mmlm.serve.engine import Engine, QueueFull
from mmlm.serve.ui import examples_for_shapes, to_conversation
from tests.helpers import TEXTS, tiny_raw

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
Q1 = "what shape is the red object?"
Q2 = "how many objects are there?"
N = 8  # max new tokens: the UI's default in these tests


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_gradio = pytest.mark.skipif(not _has("gradio"), reason="gradio is not installed (pip install 'mmlm[serve]')")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model():
    """An untrained tiny model whose greedy answers (seed 1) are non-empty and differ with and
    without the first turn's image in the conversation."""
    torch.manual_seed(1)
    m = build(parse_config(tiny_raw()), texts=TEXTS)
    return m.eval()


@pytest.fixture
def engine(model):
    e = Engine(model, max_batch=4, window_s=0.005, max_queue=16)
    yield e
    e.close()


@pytest.fixture
def shape_png(tmp_path) -> Path:
    img = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(img).ellipse((4, 4, 20, 20), fill="red")
    path = tmp_path / "red_circle.png"
    img.save(path)
    return path


def _collect(agen) -> list[str]:
    async def run():
        return [x async for x in agen]

    return asyncio.run(run())


# ------------------------------------------------------------------------------------ to_conversation
def _g6_text(text):
    return {"type": "text", "text": text}


def _g6_file(path):
    return {"type": "file", "file": {"path": path, "mime_type": "image/png"}, "alt_text": None}


GRADIO6_HISTORY = [
    {"role": "user", "content": [_g6_file("/t/a.png"), _g6_text("what is this?")], "metadata": None, "options": None},
    {"role": "assistant", "content": [_g6_text("a circle")], "metadata": None, "options": None},
    {"role": "user", "content": [_g6_text("and its color?")]},
    {"role": "assistant", "content": [_g6_text("red")]},
    {"role": "user", "content": [_g6_file("/t/b.png"), _g6_file("/t/c.png"), _g6_text("compare them")]},
    {"role": "assistant", "content": [_g6_text("the same")]},
]

# the same conversation as Gradio 5 (type="messages") writes it: one message per file, content (path,)
GRADIO5_HISTORY = [
    {"role": "user", "content": ("/t/a.png",), "metadata": None},
    {"role": "user", "content": "what is this?", "metadata": None},
    {"role": "assistant", "content": "a circle", "metadata": None},
    {"role": "user", "content": "and its color?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": ("/t/b.png",)},
    {"role": "user", "content": ("/t/c.png", "alt text")},
    {"role": "user", "content": "compare them"},
    {"role": "assistant", "content": "the same"},
]

EXPECTED = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "<image>\nwhat is this?"},
    {"role": "assistant", "content": "a circle"},
    {"role": "user", "content": "and its color?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "<image>\n<image>\ncompare them"},
    {"role": "assistant", "content": "the same"},
    {"role": "user", "content": "<image>\nwhich is bigger?"},
]


@pytest.mark.parametrize("history", [GRADIO6_HISTORY, GRADIO5_HISTORY], ids=["gradio6", "gradio5"])
def test_to_conversation_places_images_of_every_turn_in_order(history):
    message = {"text": "which is bigger?", "files": ["/t/d.png"]}
    messages, paths = to_conversation(message, history, "  be brief ")
    assert messages == EXPECTED
    assert paths == ["/t/a.png", "/t/b.png", "/t/c.png", "/t/d.png"]


def test_to_conversation_first_turn_matches_ask_and_blank_system_prompt_is_dropped():
    # MultimodalLM.ask writes one image as "<image>\nquestion": the UI's first turn must be the same prompt
    messages, paths = to_conversation({"text": Q1, "files": ["/t/x.png"]}, [], "   ")
    assert messages == [{"role": "user", "content": "<image>\n" + Q1}]
    assert paths == ["/t/x.png"]
    messages, paths = to_conversation({"text": "hi", "files": []}, [], None)
    assert (messages, paths) == ([{"role": "user", "content": "hi"}], [])
    # an image-only turn, and a text-only message given as a plain string
    messages, paths = to_conversation({"text": "", "files": [{"path": "/t/y.png"}]}, GRADIO5_HISTORY[:3], "")
    assert messages[-1] == {"role": "user", "content": "<image>"}
    assert paths == ["/t/a.png", "/t/y.png"]
    assert to_conversation("hello", [], "")[0] == [{"role": "user", "content": "hello"}]


def test_to_conversation_refuses_unknown_history_items():
    with pytest.raises(ValueError, match="history item 0"):
        to_conversation({"text": "q", "files": []}, [["user text", "bot text"]], "")
    with pytest.raises(ValueError, match="role 'tool'"):
        to_conversation({"text": "q", "files": []}, [{"role": "tool", "content": "x"}], "")


# ------------------------------------------------------------------------------------ the chat function
@needs_gradio
def test_chat_fn_streams_the_answer_of_ask(engine, model, shape_png):
    from mmlm.serve.ui import chat_fn

    respond = chat_fn(engine, default_max_tokens=N)
    outs = _collect(respond({"text": Q1, "files": [str(shape_png)]}, [], 0.0, 1.0, N, ""))
    expected = model.ask(Q1, Image.open(shape_png).convert("RGB"), max_new_tokens=N)
    assert expected.strip()
    assert outs[-1] == expected
    assert len(outs) > 1  # streamed: several cumulative updates, each extending the last
    assert all(b.startswith(a) for a, b in zip(outs, outs[1:], strict=False))


@needs_gradio
def test_closing_the_generator_cancels_the_engine_row(engine, model, shape_png, monkeypatch):
    """The stop button closes the generator: the engine must stop decoding that row."""
    from mmlm.serve.ui import chat_fn

    streams = []
    real_chat = engine.chat

    def spy_chat(*a, **kw):
        streams.append(real_chat(*a, **kw))
        return streams[-1]

    monkeypatch.setattr(engine, "chat", spy_chat)
    real_generate = model.generate

    def slow_generate(batch, **kw):  # 30 ms a step, so the row cannot finish before it is cancelled
        hook = kw["stream"]

        def slow(step, toks):
            time.sleep(0.03)
            return hook(step, toks)

        return real_generate(batch, **{**kw, "stream": slow})

    monkeypatch.setattr(model, "generate", slow_generate)
    max_tokens = 150

    respond = chat_fn(engine)

    async def run():
        t0 = time.monotonic()
        agen = respond({"text": Q1, "files": [str(shape_png)]}, [], 0.0, 1.0, max_tokens, "")
        first = await agen.__anext__()
        await agen.aclose()
        done = await asyncio.wait_for(streams[0].aresult(), timeout=20)
        return first, done, time.monotonic() - t0

    first, done, seconds = asyncio.run(run())
    assert first
    assert done.finish_reason == "cancelled"
    assert 1 <= done.completion_tokens < 20
    assert seconds < max_tokens * 0.03 / 2  # far less than the whole answer would take


@needs_gradio
def test_bad_images_long_chats_full_queue_and_failed_generation_are_shown_as_errors(engine, tmp_path, monkeypatch):
    import gradio as gr

    from mmlm.serve.ui import chat_fn

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(gr.Error, match="cannot use this image.*cannot be decoded"):
        _collect(chat_fn(engine)({"text": "what?", "files": [str(bad)]}, [], 0.0, 1.0, N, ""))
    with pytest.raises(gr.Error, match="image not found"):
        _collect(chat_fn(engine)({"text": "what?", "files": [str(tmp_path / "gone.png")]}, [], 0.0, 1.0, N, ""))

    # the tiny model's processor takes 96 tokens: a longer conversation is refused before it reaches the
    # engine, where its failure would fail the other users' requests decoded in the same batch
    long_question = " ".join(["red"] * 200)
    with pytest.raises(gr.Error, match="too long for the model: 2.. tokens"):
        _collect(chat_fn(engine)({"text": long_question, "files": []}, [], 0.0, 1.0, N, ""))
    assert not engine.batches

    with pytest.raises(gr.Error, match="type a question"):
        _collect(chat_fn(engine)({"text": "", "files": []}, [], 0.0, 1.0, N, ""))

    def broken_generate(batch, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "generate", broken_generate)
    with pytest.raises(gr.Error, match="generation failed: out of memory"):
        _collect(chat_fn(engine)({"text": "hi", "files": []}, [], 0.0, 1.0, N, ""))

    class Busy:
        model = engine.model

        def chat(self, *a, **kw):
            raise QueueFull("full")

    with pytest.raises(gr.Error, match="busy"):
        _collect(chat_fn(Busy())({"text": "hi", "files": []}, [], 0.0, 1.0, N, ""))


@needs_gradio
def test_build_chat_ui_batches_users_up_to_max_batch(engine):
    from mmlm.serve.ui import build_chat_ui

    demo = build_chat_ui(engine, examples=[{"text": Q2, "files": []}])
    limits = {fn.concurrency_limit for fn in demo.fns.values() if fn.name == "_submit_fn"}
    assert limits == {engine.max_batch}  # gradio's default of 1 would serve one user at a time


@needs_gradio
def test_launch_chat_queues_up_to_max_queue_requests(engine, monkeypatch):
    import gradio as gr

    from mmlm.serve.ui import launch_chat

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.append((self, kw)))
    launch_chat(engine, host="127.0.0.1", port=7999)
    ((demo, kw),) = launched
    assert (kw["server_name"], kw["server_port"], kw["share"]) == ("127.0.0.1", 7999, False)
    assert demo._queue.max_size == engine.max_queue  # beyond it Gradio says "queue full" instead of waiting forever


def test_importing_the_ui_does_not_import_gradio():
    code = "import sys, mmlm.serve.ui; assert 'gradio' not in sys.modules, 'gradio imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------------------------ examples
def test_examples_for_shapes_ask_questions_that_fit_their_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(images / f"s_{i}.png")
    (images / "notes.txt").write_text("not an image")
    rows = [
        {"image": "images/s_0.png", "question": "what shape is the blue object?", "type": "shape"},
        {"image": "images/s_0.png", "question": "how many objects are there?", "type": "count"},
        {"image": "images/s_1.png", "question": "is there a green square?", "type": "exists"},
        {"image": "images/s_1.png", "question": "how many objects are there?", "type": "count"},
        {"image": "images/s_9.png", "question": "what color is the circle?", "type": "color"},
    ]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = examples_for_shapes(images)
    assert [Path(e["files"][0]).name for e in ex] == ["s_0.png", "s_1.png", "s_2.png"]
    assert ex[0]["text"] == "what shape is the blue object?"  # first example: a shape question
    assert ex[1]["text"] == "how many objects are there?"  # second: a count, the image has one
    assert ex[2]["text"] and ex[2]["text"] != ex[1]["text"]  # no question for s_2: a generic one
    assert all(Path(f).is_file() for e in ex for f in e["files"])

    (tmp_path / "questions.jsonl").unlink()
    generic = examples_for_shapes(images, n=2)
    assert len(generic) == 2 and len({e["text"] for e in generic}) == 2
    assert examples_for_shapes(tmp_path / "missing") == []


# ------------------------------------------------------------------------------------ the browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chat_in_a_browser(engine, model, shape_png, tmp_path):
    """Upload an image, ask, and see the model's greedy answer; ask again and see the answer to the
    two-turn conversation (the first turn's image still in it)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    if not _has("playwright"):
        pytest.skip("playwright is not installed (pip install playwright)")
    if not _has("gradio"):
        pytest.skip("gradio is not installed (pip install 'mmlm[serve]')")
    from playwright.sync_api import expect, sync_playwright

    from mmlm.serve.ui import build_chat_ui

    image = Image.open(shape_png).convert("RGB")
    answer1 = model.ask(Q1, image, max_new_tokens=N)
    turn1 = [{"role": "user", "content": "<image>\n" + Q1}, {"role": "assistant", "content": answer1}]
    answer2 = model.chat([*turn1, {"role": "user", "content": Q2}], {"image": [image]}, max_new_tokens=N)
    assert answer1.strip() and answer2.strip()
    # without the first turn (and its image) the model answers otherwise: the check below can tell
    assert model.ask(Q2, max_new_tokens=N) != answer2

    example_png = tmp_path / "example.png"
    Image.new("RGB", (32, 32), "blue").save(example_png)
    example_answer = model.ask(Q2, Image.open(example_png).convert("RGB"), max_new_tokens=N)
    assert example_answer.strip() and example_answer != answer2
    demo = build_chat_ui(
        engine, title="mmlm test", examples=[{"text": Q2, "files": [str(example_png)]}], default_max_tokens=N
    )
    demo.queue(max_size=engine.max_queue)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    shot = tmp_path / "chat.png"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.set_default_timeout(20_000)
                page.goto(f"http://127.0.0.1:{port}/")
                expect(page.get_by_placeholder("Ask a question")).to_be_visible()
                box = page.locator(".multimodal-textbox textarea")  # its placeholder goes after a submit
                expect(page.get_by_text(Q2)).to_be_visible()  # the example prompt

                page.locator('.multimodal-textbox input[type="file"]').set_input_files(str(shape_png))
                expect(page.locator(".multimodal-textbox img")).to_have_count(1)  # the upload's thumbnail
                box.fill(Q1)
                box.press("Enter")
                bot = page.locator('[data-testid="bot"] .message-content')
                expect(bot).to_have_count(1)
                expect(bot.nth(0)).to_have_text(answer1)
                expect(page.locator('[data-testid="user"] img')).to_have_count(1)

                expect(box).to_be_editable()
                box.fill(Q2)
                box.press("Enter")
                expect(bot).to_have_count(2)
                expect(bot.nth(1)).to_have_text(answer2)
                page.screenshot(path=str(shot), full_page=True)

                # an example prompt with its image, clicked in a fresh session, runs as a first turn
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/")
                page.get_by_text(Q2).click()
                bot = page.locator('[data-testid="bot"] .message-content')
                expect(bot).to_have_count(1)
                expect(bot.nth(0)).to_have_text(example_answer)
            finally:
                browser.close()
    finally:
        demo.close()
    assert shot.stat().st_size > 0
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "serve_ui_chat.png")
