"""The serving engine without a server: batching of concurrent jobs, a refused prompt failing only
its own request, stop strings never leaking into the streamed text, the queue bound, closing."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from mmlm.config import parse_config
from mmlm.model import build
from mmlm.serve.engine import Engine, EngineClosed, QueueFull, Sampling
from tests.helpers import tiny_raw

QUESTION = "what shape is the red object ?"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(parse_config(tiny_raw()), texts=[QUESTION, "a red circle", "blue square top left yes no"]).eval()


def ask_job(engine, seed, text=QUESTION, image=True, arrival=None, **kw):
    im = Image.new("RGB", (32, 32), (200, 30, 30))
    content = ("<image>\n" if image else "") + text
    sampling = Sampling(seed=seed, **kw)
    return engine.chat([{"role": "user", "content": content}], [im] if image else [], sampling, arrival=arrival)


def test_announced_jobs_are_one_batch_and_answer_as_alone(model):
    """Six requests announced (the server is reading them) join the first one's batch; a lone
    request with nothing announced starts at once."""
    import contextlib

    engine = Engine(model, max_batch=8, window_s=5.0)
    try:
        with contextlib.ExitStack() as stack:
            arrivals = [stack.enter_context(engine.arriving()) for _ in range(6)]
            streams = []
            for s, arrival in enumerate(arrivals):
                streams.append(ask_job(engine, seed=s, temperature=1.0, max_tokens=10, arrival=arrival))
                time.sleep(0.05)  # the worker has taken the first job by now and waits for the rest
        got = [s.result().text for s in streams]
        assert dict(engine.batches) == {("ChatJob", 6): 1}
        t = time.monotonic()
        ask_job(engine, seed=0, max_tokens=2).result()
        assert time.monotonic() - t < 2.5  # did not wait out the 5 s window
        assert engine.batches[("ChatJob", 1)] == 1
    finally:
        engine.close()
    im = Image.new("RGB", (32, 32), (200, 30, 30))
    want = [model.ask(QUESTION, im, max_new_tokens=10, temperature=1.0, seed=s) for s in range(6)]
    assert got == want and len(set(got)) > 1


def test_a_prompt_the_processor_refuses_fails_its_own_request_only(model):
    engine = Engine(model, max_batch=8, window_s=5.0)
    try:
        with engine.arriving() as a, engine.arriving() as b, engine.arriving() as c:
            good = ask_job(engine, seed=1, temperature=1.0, max_tokens=6, arrival=a)
            bad = ask_job(engine, seed=1, text=" ".join(["circle"] * 200), max_tokens=6, arrival=b)  # > max_length
            other = ask_job(engine, seed=2, temperature=1.0, max_tokens=6, arrival=c)
        b = bad.result()
        assert b.finish_reason == "error" and "max_length" in b.error
        assert good.result().finish_reason in ("stop", "length") and other.result().finish_reason in ("stop", "length")
        assert good.result().text or other.result().text
        assert dict(engine.batches) == {("ChatJob", 3): 1}  # they ran together
    finally:
        engine.close()


def test_stop_strings_end_the_answer_and_never_reach_the_stream(model):
    engine = Engine(model, window_s=0.0)
    try:
        full = ask_job(engine, seed=17, temperature=1.0, max_tokens=24).result().text
        words = full.split()
        assert len(words) >= 4
        stop = " ".join(words[1:3])  # two words: the first streamed alone may be its prefix
        stream = ask_job(engine, seed=17, temperature=1.0, max_tokens=24, stop=(stop,))
        deltas = list(stream)
        assert stream.finished.text == full[: full.index(stop)] and stream.finished.finish_reason == "stop"
        assert "".join(deltas) == stream.finished.text
    finally:
        engine.close()


def test_the_queue_is_bounded_and_closing_fails_what_waits(model):
    engine = Engine(model, max_batch=1, window_s=0.0, max_queue=2)
    release, entered = threading.Event(), threading.Event()
    real = engine._run_chat
    engine._run_chat = lambda jobs: (entered.set(), release.wait(30), real(jobs))
    try:
        first = ask_job(engine, seed=1, max_tokens=2)
        assert entered.wait(30)  # the worker holds the first
        waiting = [ask_job(engine, seed=s, max_tokens=2) for s in (2, 3)]
        with pytest.raises(QueueFull, match="2 requests waiting"):
            ask_job(engine, seed=4, max_tokens=2)
        closer = threading.Thread(target=engine.close)  # close while the worker is held
        closer.start()
        assert [w.result().finish_reason for w in waiting] == ["error", "error"]
        assert "closed" in waiting[0].result().error
    finally:
        release.set()
    closer.join(10)
    assert first.result().finish_reason in ("stop", "length")
    with pytest.raises(EngineClosed):
        ask_job(engine, seed=5)
