"""The OpenAI-compatible HTTP API (``mmlm serve``): ``POST /v1/chat/completions``, ``POST
/v1/embeddings``, ``GET /v1/models``, ``GET /health``, and the Gradio chat at ``/ui``, all on one
``Engine`` (``mmlm/serve/engine.py``).

The wire format follows ../shared/CONVENTIONS.md ("Serving"): content as a string or parts
(``text``, ``image_url`` with a data URL; one image part is one image, written into mmlm's
conversation as the ``<image>`` placeholder at its place); streaming as server-sent events with the
same id on every chunk, an optional usage chunk, errors as an ``error`` event, then ``[DONE]``;
embeddings as float lists or base64 little-endian float32. Every client mistake is a 400 (never a
422 or a 5xx, which the official client retries), 401 for a bad key, 404 for an unknown model, 429
for a full queue, in OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Unknown extra
fields are accepted and ignored, as vLLM does.
"""

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from typing import Any

import numpy as np

from mmlm.errors import SampleError
from mmlm.modalities import IMAGE_PLACEHOLDER
from mmlm.serve.engine import Engine, EngineClosed, QueueFull, Sampling
from mmlm.serve.limits import RequestError, ServeLimits, data_url_bytes, decode_checked, image_from_url

log = logging.getLogger("mmlm.serve")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


# ------------------------------------------------------------------------------------ requests
def _field(body: dict, key: str, kinds, default=None, param: str | None = None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise RequestError(f"'{key}' must be {_kind_names(kinds)}, not a boolean", param or key)
    if not isinstance(value, kinds):
        raise RequestError(f"'{key}' must be {_kind_names(kinds)}, not {type(value).__name__}", param or key)
    return value


def _kind_names(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = float(_field(body, key, (int, float), default))
    if not lo <= value <= hi:
        raise RequestError(f"'{key}' must be between {lo} and {hi}, not {value}", key)
    return value


def chat_messages(body: dict, limits: ServeLimits) -> tuple[list[dict], list]:
    """OpenAI messages -> mmlm's conversation (``<image>`` per image part) and the images."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", where)
        role = ROLES.get(m.get("role"))
        if role is None:
            raise RequestError(
                f"{where}.role {m.get('role')!r} is not supported; use system, user or assistant", f"{where}.role"
            )
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise RequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        text = []
        for j, part in enumerate(parts):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                t = part.get("text")
                if not isinstance(t, str):
                    raise RequestError(f"{at}.text must be a string", f"{at}.text")
                if IMAGE_PLACEHOLDER in t:
                    raise RequestError(
                        f"{at}.text contains {IMAGE_PLACEHOLDER}; send images as image_url parts", f"{at}.text"
                    )
                text.append(t)
            elif kind == "image_url":
                if role != "user":
                    raise RequestError(f"{at}: images are accepted in user messages only", at)
                if len(images) >= limits.max_images:
                    raise RequestError(
                        f"more than max_images={limits.max_images} images in one request", at, "too_many_images"
                    )
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                images.append(image_from_url(url, limits, f"{at}.image_url.url"))
                text.append(IMAGE_PLACEHOLDER)
            else:
                raise RequestError(f"{at}.type {kind!r} is not supported; use text or image_url", f"{at}.type")
        out.append({"role": role, "content": _join(text)})
    if out[-1]["role"] == "assistant":
        raise RequestError("the last message must not be the assistant's: there is nothing to answer", "messages")
    return out, images


def _join(parts: list[str]) -> str:
    """Text and image parts in order; an image placeholder on its own line, as mmlm's data has it."""
    s = ""
    for p in parts:
        if p == IMAGE_PLACEHOLDER:
            s += ("\n" if s and not s.endswith("\n") else "") + p + "\n"
        else:
            s += p
    return s.rstrip("\n") if s.endswith(IMAGE_PLACEHOLDER + "\n") else s


def sampling_of(body: dict, limits: ServeLimits) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, key, int, limits.default_max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(
            f"'{key}' must be between 1 and {limits.max_tokens}, not {max_tokens}", key, "too_many_tokens"
        )
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise RequestError("'stop' must be a string or a list of at most 4 strings", "stop")
    n = _field(body, "n", int, 1)
    if n != 1:
        raise RequestError("only n=1 is supported", "n")
    seed = _field(body, "seed", int, None)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=seed,
        stop=tuple(s for s in stop if s),
    )


# ---------------------------------------------------------------------------------------- app
def create_app(
    engine: Engine,
    model_id: str,
    limits: ServeLimits | None = None,
    api_key: str | None = None,
    ui: bool = True,
):
    """The FastAPI app serving ``engine``'s model as ``model_id``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or ServeLimits()
    model = engine.model
    max_prompt = limits.max_prompt_tokens or model.processor.config.max_length
    created = int(time.time())
    width = (
        model.config.model.embedding.dim or model.embedding_width
    )  # what embed returns (every pooling keeps the LLM width)
    app = FastAPI(title="mmlm", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, param=None, code=None, kind=None) -> JSONResponse:
        if len(message) > limits.max_error_chars:
            message = message[: limits.max_error_chars - 3] + "..."
        kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request, err: RequestError):
        return error(err.status, str(err), err.param, err.code, err.type)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err):
        first = err.errors()[0] if err.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return error(400, f"invalid request: {first.get('msg', err)}", param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err):
        status = 404 if err.status_code == 404 else 400 if err.status_code < 500 else err.status_code
        return error(status, str(err.detail), None, "not_found" if status == 404 else "invalid_request")

    @app.exception_handler(Exception)
    async def _unexpected(request, err):  # a bug of ours: say so, keep serving
        log.exception("unexpected error")
        return error(500, f"internal error: {type(err).__name__}: {err}", None, "internal_error", "server_error")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if path.startswith("/v1/"):
            if api_key is not None:
                got = request.headers.get("authorization", "")
                token = got[7:] if got.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    return error(401, "invalid or missing API key (Authorization: Bearer KEY)", None, "invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
                return error(
                    400, f"the request body is over max_body_bytes={limits.max_body_bytes:,}", None, "request_too_large"
                )
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise RequestError(
                    f"the request body is over max_body_bytes={limits.max_body_bytes:,}", None, "request_too_large"
                )
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(f"the body is not valid JSON: {err}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object", None, "invalid_json")
        name = body.get("model")
        if name is not None and name != model_id:
            raise RequestError(
                f"the model {name!r} does not exist; this server has {model_id!r}", "model", "model_not_found", 404
            )
        extra = sorted(set(body) - KNOWN_FIELDS)
        if extra:
            log.info("ignored request fields: %s", extra)
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queued()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "mmlm"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != model_id:
            raise RequestError(f"the model {name!r} does not exist", "model", "model_not_found", 404)
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mmlm"}

    context = getattr(getattr(model.llm, "config", None), "max_position_embeddings", None)

    def check_prompt(messages: list[dict], images: list, max_tokens: int):
        """The prompt's token count, refused over max_prompt_tokens, when the prompt and max_tokens
        do not fit the LLM's context, or when the processor refuses it."""
        try:
            media = {"image": images} if images else {}
            encoded = model.processor.encode(messages, media, add_generation_prompt=True, index=0)
        except (SampleError, ValueError) as err:
            raise RequestError(str(err), "messages", "invalid_prompt") from None
        n = len(encoded.input_ids)
        if n > max_prompt:
            raise RequestError(
                f"the prompt is {n} tokens (images included), over max_prompt_tokens={max_prompt}",
                "messages",
                "too_many_tokens",
            )
        if context and n + max_tokens > context:
            raise RequestError(
                f"the prompt ({n} tokens) and max_tokens ({max_tokens}) exceed the model's context of {context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        return encoded

    def submit(fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except QueueFull as err:
            raise RequestError(str(err), None, "queue_full", 429) from None
        except EngineClosed as err:
            raise RequestError(str(err), None, "unavailable", 503) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        stream = _field(body, "stream", bool, False)
        options = _field(body, "stream_options", dict, None)
        if options is not None and not stream:
            raise RequestError("'stream_options' is only allowed with stream: true", "stream_options")
        usage_chunk = bool((options or {}).get("include_usage", False))
        sampling = sampling_of(body, limits)

        def prepare():  # off the event loop: images decoded, the prompt encoded and measured
            messages, images = chat_messages(body, limits)
            return messages, images, check_prompt(messages, images, sampling.max_tokens)

        with engine.arriving() as arrival:  # a batch about to start waits (up to the window) for this request
            messages, images, encoded = await asyncio.to_thread(prepare)
            loop = asyncio.get_running_loop()
            job = submit(engine.chat, messages, images, sampling, loop=loop, encoded=encoded, arrival=arrival)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            try:
                done = await job.aresult()
            except asyncio.CancelledError:
                job.cancel()
                raise
            if done.finish_reason == "error":
                return error(500, f"generation failed: {done.error}", None, "internal_error", "server_error")
            return {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "finish_reason": done.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": _usage(done.prompt_tokens, done.completion_tokens),
                "system_fingerprint": None,
            }

        def chunk(delta: dict, finish=None, usage=None, choices=True) -> str:
            c: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id}
            c["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}] if choices else []
            if usage_chunk:
                c["usage"] = usage
            return f"data: {json.dumps(c)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for delta in job:
                    yield chunk({"content": delta})
                done = job.finished
                if done.finish_reason == "error":
                    err = {
                        "message": f"generation failed: {done.error}",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                    yield f"data: {json.dumps({'error': err})}\n\n"
                else:
                    yield chunk({}, done.finish_reason)
                    if usage_chunk:
                        yield chunk({}, usage=_usage(done.prompt_tokens, done.completion_tokens), choices=False)
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the stream ended): free the row at the next step
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_json(request)
        fmt = _field(body, "encoding_format", str, "float")
        if fmt not in ("float", "base64"):
            raise RequestError("'encoding_format' must be float or base64", "encoding_format")
        dim = _field(body, "dimensions", int, None)
        if dim is not None and not 1 <= dim <= width:
            raise RequestError(f"'dimensions' must be between 1 and {width}, not {dim}", "dimensions")
        with engine.arriving() as arrival:
            items = await asyncio.to_thread(embedding_items, body, limits)
            job = submit(engine.embed_job, items, dim, "query", loop=asyncio.get_running_loop(), arrival=arrival)
        vecs = await job.channel.aget()
        if isinstance(vecs, SampleError):
            raise RequestError(str(vecs), "input", "invalid_input")
        if isinstance(vecs, BaseException):
            return error(500, f"embedding failed: {vecs}", None, "internal_error", "server_error")
        arr = vecs.numpy().astype("<f4")
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist(),
            }
            for i, v in enumerate(arr)
        ]
        tokens = sum(_item_tokens(model, it) for it in items)
        return {
            "object": "list",
            "data": data,
            "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    if ui:
        try:
            import gradio as gr

            from mmlm.serve.ui import build_chat_ui
        except ImportError:
            log.warning("gradio is not installed: no chat UI at /ui (pip install 'mmlm[serve]')")
        else:
            blocks = build_chat_ui(engine, title=model_id, default_max_tokens=limits.default_max_tokens)
            blocks.queue(max_size=engine.max_queue, default_concurrency_limit=engine.max_batch)
            extra: dict[str, Any] = {"max_file_size": limits.max_image_bytes}
            if api_key is not None:  # the chat asks for the key too (any user name, the key as password)
                extra["auth"] = lambda user, password: hmac.compare_digest(str(password).encode(), api_key.encode())
                extra["auth_message"] = "This server needs its API key: any user name, the key as password."
            app = gr.mount_gradio_app(app, blocks, path="/ui", **extra)
    return app


KNOWN_FIELDS = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "input",
    "encoding_format",
    "dimensions",
    "user",
}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def embedding_items(body: dict, limits: ServeLimits) -> list:
    """``input`` (a string or a list of strings; a ``data:image/...`` string is an image) or vLLM's
    chat-style ``messages`` (one item: the text and image of the conversation) -> embed items."""
    if body.get("messages") is not None:
        if body.get("input") is not None:
            raise RequestError("give 'input' or 'messages', not both", "messages")
        messages, images = chat_messages(body, limits)
        if len(images) > 1:
            raise RequestError("an embedding item holds at most one image", "messages", "too_many_images")
        text = "\n".join(m["content"].replace(IMAGE_PLACEHOLDER, "").strip() for m in messages).strip()
        item: dict[str, Any] = {}
        if text:
            item["text"] = text
        if images:
            item["image"] = images[0]
        if not item:
            raise RequestError("the messages hold no text and no image", "messages")
        return [item]
    raw = body.get("input")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RequestError("'input' must be a non-empty string or list of strings", "input")
    if len(raw) > limits.max_embedding_inputs:
        raise RequestError(
            f"'input' has {len(raw)} items, over max_embedding_inputs={limits.max_embedding_inputs}", "input"
        )
    items, n_images = [], 0
    for i, x in enumerate(raw):
        if not isinstance(x, str):
            raise RequestError(f"input[{i}] must be a string (token ids are not accepted)", f"input[{i}]")
        if not x.strip():
            raise RequestError(f"input[{i}] is empty", f"input[{i}]")
        if x.startswith("data:image/"):
            n_images += 1
            if n_images > limits.max_images:
                raise RequestError(f"more than max_images={limits.max_images} images", f"input[{i}]", "too_many_images")
            items.append(decode_checked(data_url_bytes(x, limits, f"input[{i}]"), limits, f"input[{i}]"))
        else:
            items.append(x)
    return items


def _item_tokens(model, item) -> int:
    text = item if isinstance(item, str) else item.get("text", "") if isinstance(item, dict) else ""
    has_image = not isinstance(item, str) and (not isinstance(item, dict) or "image" in item)
    n = len(model.tokenizer(text)["input_ids"]) if text else 0
    if has_image:
        n += model.processor.media["image"].num_tokens
    return n


def decode_embeddings(data: list[dict]) -> np.ndarray:
    """The vectors of an embeddings reply, float or base64 (as the official client decodes them)."""
    rows = [
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
        if isinstance(d["embedding"], str)
        else d["embedding"]
        for d in data
    ]
    return np.asarray(rows, dtype=np.float32)
