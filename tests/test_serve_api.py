"""The OpenAI-compatible API on a real server (uvicorn on a loopback port), called with the official
``openai`` client and with raw HTTP: answers equal ``MultimodalLM.ask`` / ``embed`` for the same
input and seed, streamed text equals the plain answer, and every limit and client mistake gets its
status and message while the server keeps answering."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from mmlm.config import parse_config  # noqa: E402
from mmlm.model import build  # noqa: E402
from mmlm.serve.api import create_app  # noqa: E402
from mmlm.serve.engine import Engine  # noqa: E402
from mmlm.serve.limits import RequestError, ServeLimits, fetch  # noqa: E402
from tests.helpers import tiny_raw  # noqa: E402

KEY = "sk-test-key"
QUESTION = "what shape is the red object ?"
TEXTS = [QUESTION, "a red circle", "blue square top left", "how many objects are there ?", "yes no two three"]
LIMITS = dict(
    max_images=2,
    max_image_pixels=40_000,
    max_image_bytes=60_000,
    max_body_bytes=400_000,
    max_tokens=24,
    default_max_tokens=8,
    max_prompt_tokens=60,
    max_embedding_inputs=4,
    batch_window_ms=30,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A uvicorn server in a thread, stopped by ``close``."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(parse_config(tiny_raw()), texts=TEXTS).eval()


@pytest.fixture(scope="module")
def served(model):
    engine = Engine(model, max_batch=8, window_s=0.03, max_queue=64)
    server = Server(create_app(engine, "tiny", ServeLimits(**LIMITS), api_key=KEY, ui=False))
    yield server, engine
    server.close()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def image(color=(220, 30, 30), size=32) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    im.paste(color, (8, 8, 24, 24))
    return im


def data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_question(im, text=QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url(im)}}, {"type": "text", "text": text}],
        }
    ]


def post(served, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(served[0].url + path, data=data, method="POST")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# --------------------------------------------------------------------------------------- answers
def test_chat_answer_equals_ask_for_the_same_image_question_and_seed(client, model):
    im = image()
    for seed in (1, 2):
        want = model.ask(QUESTION, im, max_new_tokens=12, temperature=1.0, seed=seed)
        got = client.chat.completions.create(
            model="tiny", messages=image_question(im), max_tokens=12, temperature=1.0, seed=seed
        )
        assert want, "a sampled answer of the untrained model is not empty"
        assert got.choices[0].message.content == want
        assert got.choices[0].finish_reason in ("stop", "length")
        assert got.usage.completion_tokens >= 1
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    a = client.chat.completions.create(model="tiny", messages=image_question(im), max_tokens=12, seed=1)
    b = client.chat.completions.create(model="tiny", messages=image_question(im), max_tokens=12, seed=2)
    assert a.choices[0].message.content != b.choices[0].message.content  # the seed reaches the sampler


def test_streamed_text_equals_the_plain_answer_and_the_usage_chunk_arrives(client):
    msgs = image_question(image((30, 30, 220)))
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, seed=5)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=16, seed=5, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and text
    assert len({c.id for c in chunks}) == 1
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # streamed, not one piece
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_greedy_answers_are_the_same_alone_and_in_a_batch(client, served, model):
    """Eight concurrent requests are decoded as one batch (the engine says so) and each gets the
    answer it gets alone, greedy and sampled."""
    from concurrent.futures import ThreadPoolExecutor

    ims = [image((40 * i, 200 - 20 * i, 30)) for i in range(8)]
    alone = [model.ask(QUESTION, im, max_new_tokens=10, temperature=0.0) for im in ims]
    alone += [model.ask(QUESTION, im, max_new_tokens=10, temperature=1.0, seed=i) for i, im in enumerate(ims[:4])]
    jobs = [dict(temperature=0.0)] * 8 + [dict(temperature=1.0, seed=i) for i in range(4)]
    before = sum(n for (kind, size), n in served[1].batches.items() if kind == "ChatJob" and size >= 4)

    def one(i):
        im = ims[i] if i < 8 else ims[i - 8]
        r = client.chat.completions.create(model="tiny", messages=image_question(im), max_tokens=10, **jobs[i])
        return r.choices[0].message.content

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, range(12)))
    assert got == alone
    after = sum(n for (kind, size), n in served[1].batches.items() if kind == "ChatJob" and size >= 4)
    assert after > before


def test_stop_strings_cut_the_answer(client, model):
    im = image()
    full = model.ask(QUESTION, im, max_new_tokens=12, temperature=1.0, seed=3)
    words = full.split()
    assert len(words) >= 3
    r = client.chat.completions.create(
        model="tiny", messages=image_question(im), max_tokens=12, seed=3, stop=[" " + words[2]]
    )
    assert r.choices[0].message.content == full[: full.index(" " + words[2])]
    assert r.choices[0].finish_reason == "stop"


def test_embeddings_in_the_clients_default_base64_equal_model_embed(client, model):
    texts = ["a red circle", "blue square top left"]
    got = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64 and decodes it
    want = model.embed(texts)
    vecs = torch.tensor([d.embedding for d in got.data])
    torch.testing.assert_close(vecs, want, atol=1e-6, rtol=0)
    assert [d.index for d in got.data] == [0, 1]
    assert got.usage.prompt_tokens > 0
    floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    torch.testing.assert_close(torch.tensor([d.embedding for d in floats.data]), want, atol=1e-6, rtol=0)
    short = client.embeddings.create(model="tiny", input=texts, dimensions=16)
    torch.testing.assert_close(
        torch.tensor([d.embedding for d in short.data]), model.embed(texts, dim=16), atol=1e-6, rtol=0
    )


def test_image_embeddings_by_data_url_and_by_chat_messages(served, model):
    im = image()
    code, body = post(served, "/v1/embeddings", {"model": "tiny", "input": [data_url(im)]})
    assert code == 200, body
    np.testing.assert_allclose(body["data"][0]["embedding"], model.embed([im])[0].numpy(), atol=1e-6)
    code, body = post(served, "/v1/embeddings", {"model": "tiny", "messages": image_question(im, "a red circle")})
    assert code == 200, body
    want = model.embed([{"image": im, "text": "a red circle"}])[0].numpy()
    np.testing.assert_allclose(body["data"][0]["embedding"], want, atol=1e-6)


def test_models_health_and_the_api_key(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(served[0].url + "/health", timeout=10) as r:  # no key needed
        assert json.loads(r.read())["status"] == "ok"
    bad = openai.OpenAI(base_url=served[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    code, body = post(served, "/v1/embeddings", {"model": "tiny", "input": "x"}, key=None)
    assert code == 401 and body["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------- limits, errors
def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a decompression bomb's
    header: decoding it would allocate width * height * 3 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def user_parts(*parts) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


def img_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": QUESTION}
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (190, 190, 3), dtype=np.uint8))  # ~108 kB PNG
CASES = {
    "malformed JSON": (None, b'{"model": "tiny", "messages": [', 400, "invalid_json", None),
    "bad base64": (
        user_parts(img_part("data:image/png;base64,@@@notbase64"), TEXT),
        None,
        400,
        "invalid_base64",
        "messages[0].content[0].image_url.url",
    ),
    "not an image": (
        user_parts(img_part("data:image/png;base64," + base64.b64encode(b"hello").decode()), TEXT),
        None,
        400,
        "invalid_image",
        "messages[0].content[0].image_url.url",
    ),
    "bomb header": (
        user_parts(img_part("data:image/png;base64," + base64.b64encode(png_claiming(30000, 30000)).decode()), TEXT),
        None,
        400,
        "image_too_large",
        "messages[0].content[0].image_url.url",
    ),
    "too many bytes": (
        user_parts(img_part(data_url(NOISE)), TEXT),
        None,
        400,
        "image_too_large",
        "messages[0].content[0].image_url.url",
    ),
    "too many images": (
        user_parts(*[img_part(data_url(image()))] * 3, TEXT),
        None,
        400,
        "too_many_images",
        "messages[0].content[2]",
    ),
    "remote url": (
        user_parts(img_part("http://169.254.169.254/latest/meta-data.png"), TEXT),
        None,
        400,
        "url_not_allowed",
        "messages[0].content[0].image_url.url",
    ),
    "file url": (
        user_parts(img_part("file:///etc/passwd"), TEXT),
        None,
        400,
        "invalid_request",
        "messages[0].content[0].image_url.url",
    ),
    "prompt too long": (
        user_parts({"type": "text", "text": " ".join(["circle"] * 70)}),
        None,
        400,
        "too_many_tokens",
        "messages",
    ),
    "max_tokens over the limit": ({**user_parts(TEXT), "max_tokens": 25}, None, 400, "too_many_tokens", "max_tokens"),
    "a placeholder in the text": (
        user_parts({"type": "text", "text": "<image> what?"}),
        None,
        400,
        "invalid_request",
        "messages[0].content[0].text",
    ),
    "stream_options without stream": (
        {**user_parts(TEXT), "stream_options": {"include_usage": True}},
        None,
        400,
        "invalid_request",
        "stream_options",
    ),
    "temperature not a number": (
        {**user_parts(TEXT), "temperature": "hot"},
        None,
        400,
        "invalid_request",
        "temperature",
    ),
    "n = 2": ({**user_parts(TEXT), "n": 2}, None, 400, "invalid_request", "n"),
    "unknown role": (
        {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]},
        None,
        400,
        "invalid_request",
        "messages[0].role",
    ),
    "body too large": (None, b'{"model": "tiny", "pad": "' + b"x" * 500_000 + b'"}', 400, "request_too_large", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_request_gets_a_400_naming_the_field_and_the_next_request_succeeds(served, case):
    body, raw, status, code, param = CASES[case]
    t = time.time()
    got_status, got = post(served, "/v1/chat/completions", body, raw=raw)
    assert got_status == status, got
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["code"] == code and got["error"]["param"] == param, got
    assert got["error"]["type"] == "invalid_request_error" and got["error"]["message"]
    assert len(got["error"]["message"]) <= 500
    if case == "bomb header":  # refused from the header: nothing of 2.7 GB was allocated or decoded
        assert time.time() - t < 5 and "40,000" in got["error"]["message"]
    ok_status, ok = post(served, "/v1/chat/completions", user_parts(TEXT))
    assert ok_status == 200 and ok["choices"][0]["message"]["content"] is not None


def test_bad_embedding_requests_are_400s(served):
    for body, param in (
        ({"model": "tiny", "input": []}, "input"),
        ({"model": "tiny", "input": ["a"] * 5}, "input"),
        ({"model": "tiny", "input": [1, 2, 3]}, "input[0]"),
        ({"model": "tiny", "input": "x", "dimensions": 4096}, "dimensions"),
        ({"model": "tiny", "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "tiny", "input": ["data:image/png;base64,AAAA"]}, "input[0]"),
    ):
        code, got = post(served, "/v1/embeddings", body)
        assert code == 400 and got["error"]["param"] == param, (body, got)
    code, got = post(served, "/v1/embeddings", {"model": "tiny", "input": "a red circle"})
    assert code == 200 and len(got["data"]) == 1


def test_a_full_queue_answers_429_and_the_server_recovers(model):
    """A worker held busy, one request waiting (max_queue=1): the next gets 429 (the client retries
    429 itself: with max_retries=0 it raises RateLimitError); once the worker is free, all succeed."""
    engine = Engine(model, max_batch=1, window_s=0.0, max_queue=1)
    release, entered = threading.Event(), threading.Event()
    real = engine._run_chat
    engine._run_chat = lambda jobs: (entered.set(), release.wait(30), real(jobs))
    server = Server(create_app(engine, "tiny", ServeLimits(max_queue=1), ui=False))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": QUESTION}]
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(2)
        first = pool.submit(c.chat.completions.create, model="tiny", messages=msgs, max_tokens=4, temperature=0)
        assert entered.wait(30)  # the worker took the first and is held
        second = pool.submit(c.chat.completions.create, model="tiny", messages=msgs, max_tokens=4, temperature=0)
        deadline = time.time() + 30
        while not engine.queued():  # the second waits in the queue
            assert time.time() < deadline and not second.done(), "the second request never reached the queue"
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as err:
            c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
        assert err.value.body["code"] == "queue_full"
        release.set()
        assert first.result().choices[0].message.content == second.result().choices[0].message.content
        assert c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4).choices
    finally:
        release.set()
        server.close()
        engine.close()


def test_a_client_that_disconnects_frees_its_row(served, model, monkeypatch):
    """A stream closed after its first text: the engine finishes that row as cancelled, before
    the tokens the same request decodes when its client stays, and the next request is answered.
    Each decoding step is slowed to 50 ms so the disconnect arrives mid-answer."""
    im = image()
    body = {**user_parts(img_part(data_url(im)), TEXT), "max_tokens": 24, "seed": 17}
    code, whole = post(served, "/v1/chat/completions", body)
    n_whole = whole["usage"]["completion_tokens"]
    assert code == 200 and n_whole >= 10
    engine = served[1]
    forward = model.llm.forward
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: (time.sleep(0.05), forward(*a, **k))[1])
    req = urllib.request.Request(
        served[0].url + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(), method="POST"
    )
    req.add_header("Authorization", f"Bearer {KEY}")
    req.add_header("Content-Type", "application/json")
    n = len(engine.recent)
    resp = urllib.request.urlopen(req, timeout=60)
    while b'"content": ""' in (line := resp.readline()) or not line.strip():  # up to the first text
        pass
    resp.close()
    deadline = time.time() + 30
    while len(engine.recent) == n and time.time() < deadline:
        time.sleep(0.02)
    done = list(engine.recent)[n]
    assert done.finish_reason == "cancelled" and done.completion_tokens < n_whole
    monkeypatch.undo()
    code, _ = post(served, "/v1/chat/completions", user_parts(TEXT))
    assert code == 200


# ------------------------------------------------------------------------------ remote fetching
def test_remote_images_are_refused_unless_allowed_and_never_from_private_addresses():
    closed = ServeLimits()
    with pytest.raises(RequestError, match="not fetched"):
        fetch("https://example.com/cat.png", closed, "p")
    allowed = ServeLimits(allow_domains=["example.com"])
    with pytest.raises(RequestError, match="not in allow_domains"):
        fetch("https://evil.test/cat.png", allowed, "p")

    def resolves_to(ip):
        return lambda host, port, type=None: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    for ip in ("127.0.0.1", "10.0.0.5", "169.254.169.254", "192.168.1.1", "0.0.0.0"):
        with pytest.raises(RequestError, match="private, loopback or link-local") as err:
            fetch("https://img.example.com/cat.png", allowed, "p", resolve=resolves_to(ip))
        assert err.value.param == "p" and err.value.code == "url_not_allowed"


def test_the_chat_at_ui_asks_for_the_api_key_when_the_server_has_one(model):
    pytest.importorskip("gradio")
    import http.cookiejar
    import urllib.parse

    engine = Engine(model)
    server = Server(create_app(engine, "tiny", api_key=KEY, ui=True))
    try:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url + "/ui/config", timeout=30)
        assert err.value.code == 401
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        for password, ok in (("wrong", False), (KEY, True)):
            form = urllib.parse.urlencode({"username": "me", "password": password}).encode()
            try:
                opener.open(server.url + "/ui/login", data=form, timeout=30)
                logged_in = True
            except urllib.error.HTTPError:
                logged_in = False
            assert logged_in == ok
        with opener.open(server.url + "/ui/config", timeout=30) as r:
            assert r.status == 200 and "components" in json.loads(r.read())
    finally:
        server.close()
        engine.close()
