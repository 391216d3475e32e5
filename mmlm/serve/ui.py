"""The Gradio chat (``mmlm serve`` at ``/ui``, ``mmlm demo --chat``): a ``ChatInterface`` with a
multimodal textbox (text plus images, in any turn), streaming answers from the shared ``Engine``,
sampling settings, a stop button that frees the request's row in the engine, and example prompts.

Gradio is imported inside the functions that need it, so mmlm imports without it. The chat
history arrives in Gradio 6's shape (content parts ``{"type": "text"}`` / ``{"type": "file"}``) or
Gradio 5's ``type="messages"`` shape (a plain string, or one separate message per file whose
content is ``(path,)``); ``to_conversation`` turns either into mmlm's conversation, each image the
``<image>`` placeholder at its place (see ../shared/CONVENTIONS.md, "Serving").
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmlm.modalities import IMAGE_PLACEHOLDER

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_TOKENS_CEILING = 1024  # the max-new-tokens slider's top (or the default, when larger)
TEXTBOX_PLACEHOLDER = "Ask a question; attach images with the paperclip (in any turn)"


# ------------------------------------------------------------------------------------ history
def _file_path(part: Any) -> str | None:
    """The path of a file part in any of Gradio's shapes, else None."""
    if isinstance(part, (tuple, list)):  # Gradio 5: (path,) or (path, alt_text)
        return str(part[0]) if part and isinstance(part[0], (str, Path)) else None
    if isinstance(part, dict):
        if part.get("type") == "file" or "file" in part:  # Gradio 6: {"type": "file", "file": {"path", ...}}
            f = part.get("file")
            if isinstance(f, dict) and f.get("path"):
                return str(f["path"])
            return str(f) if isinstance(f, (str, Path)) else None
        if part.get("type") == "component":  # Gradio 6: a component message (gr.Image in the history)
            value = part.get("value")
            return str(value["path"]) if isinstance(value, dict) and value.get("path") else None
        if part.get("path"):  # a FileData dict
            return str(part["path"])
        return None
    value = getattr(part, "value", None)  # Gradio 5: a component instance (gr.Image)
    if isinstance(value, dict) and value.get("path"):
        return str(value["path"])
    return None


def _pieces(content: Any) -> list[tuple[str, str]]:
    """One message's content -> ``[("text", str) | ("image", path)]`` in order."""
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)] if content else []
    if isinstance(content, tuple):  # Gradio 5: one file as (path,) / (path, alt_text)
        path = _file_path(content)
        return [("image", path)] if path else []
    parts = content if isinstance(content, list) else [content]
    out: list[tuple[str, str]] = []
    for part in parts:
        if isinstance(part, str):
            if part:
                out.append(("text", part))
        elif isinstance(part, dict) and part.get("type") == "text":
            if part.get("text"):
                out.append(("text", str(part["text"])))
        else:
            path = _file_path(part)
            if path:
                out.append(("image", path))
    return out


def _render(pieces: list[tuple[str, str]]) -> str:
    """Pieces -> message text, one per line, each image its ``<image>`` placeholder: as the API and
    mmlm's content-part records write a turn (one image and a question: ``<image>\\nquestion``, the
    prompt ``MultimodalLM.ask`` writes)."""
    return "\n".join(IMAGE_PLACEHOLDER if kind == "image" else value for kind, value in pieces)


def _message_pieces(message: Any) -> list[tuple[str, str]]:
    """The submitted message (``{"text", "files"}``, or a string) -> pieces: its files, then its text."""
    if isinstance(message, str):
        return [("text", message)] if message else []
    if not isinstance(message, dict):
        raise ValueError(f"unexpected chat message {type(message).__name__}: expected {{'text', 'files'}}")
    out = []
    for f in message.get("files") or []:
        path = f if isinstance(f, (str, Path)) else _file_path(f)
        if path:
            out.append(("image", str(path)))
    if message.get("text"):
        out.append(("text", str(message["text"])))
    return out


def to_conversation(
    message: Any, history: Sequence[Any], system_prompt: str | None = ""
) -> tuple[list[dict], list[str]]:
    """Gradio's submitted ``message`` and chat ``history`` (Gradio 5 ``type="messages"`` or Gradio
    6) -> mmlm's conversation (``{"role", "content"}`` with ``<image>`` at each image's place) and
    the image paths in placeholder order. Consecutive messages of one role (Gradio 5 sends each file
    as its own message) make one turn; files in assistant messages are dropped (the model reads
    images in user turns); a non-blank ``system_prompt`` becomes the first message."""
    turns: list[tuple[str, list[tuple[str, str]]]] = []

    def add(role: str, pieces: list[tuple[str, str]]) -> None:
        if role == "assistant":
            pieces = [p for p in pieces if p[0] == "text"]
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(pieces)
        else:
            turns.append((role, list(pieces)))

    for i, item in enumerate(history or []):
        if not isinstance(item, dict) or "role" not in item:
            raise ValueError(f"chat history item {i} is not a {{'role', 'content'}} message: {item!r:.200}")
        role = item["role"]
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"chat history item {i} has role {role!r}")
        add(role, _pieces(item.get("content")))
    add("user", _message_pieces(message))

    messages: list[dict] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    paths: list[str] = []
    for role, pieces in turns:
        if role != "assistant" and not pieces:
            continue  # an empty user turn (an image-less, text-less submit)
        messages.append({"role": role, "content": _render(pieces)})
        paths.extend(v for k, v in pieces if k == "image")
    return messages, paths


# ------------------------------------------------------------------------------------ the chat
def chat_fn(engine, default_max_tokens: int = 64):
    """The ChatInterface function: an async generator ``(message, history, temperature, top_p,
    max_tokens, system_prompt)`` yielding the answer so far. Images are read with the model's
    ``processor.max_image_pixels``; bad images, a full queue and failed generations are shown as
    ``gr.Error``. Closing the generator (the stop button, a closed tab) cancels the engine stream,
    so its row stops decoding at the next step."""
    import gradio as gr

    from mmlm.errors import SampleError, SampleTooLong
    from mmlm.images import load_image
    from mmlm.serve.engine import EngineClosed, QueueFull, Sampling

    proc = engine.model.processor
    limit = proc.config.max_image_pixels

    def load_all(paths: list[str]) -> list:
        return [load_image(p, limit) for p in paths]

    def encode(messages: list[dict], images: list):
        """The prompt as the engine decodes it, encoded here (off the event loop) so that what the
        processor refuses is shown to the user, and handed to the engine so it is not encoded twice."""
        return proc.encode(messages, {"image": images} if images else {}, add_generation_prompt=True, index=0)

    async def respond(message, history, temperature=0.0, top_p=1.0, max_tokens=None, system_prompt=""):
        try:
            messages, paths = to_conversation(message, history, system_prompt)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if not messages or messages[-1]["role"] != "user":
            raise gr.Error("type a question or attach an image")
        try:
            images = await asyncio.to_thread(load_all, paths)
        except SampleError as err:
            raise gr.Error(f"cannot use this image: {err}") from None
        try:
            encoded = await asyncio.to_thread(encode, messages, images)
        except SampleTooLong as err:
            raise gr.Error(
                f"the conversation is too long for the model: {err.length} tokens (images included), at most "
                f"{err.max_length}; clear the chat (the trash icon) to start again"
            ) from None
        except (SampleError, ValueError) as err:
            raise gr.Error(f"cannot use this conversation: {err}") from None
        sampling = Sampling(
            max_tokens=int(max_tokens if max_tokens is not None else default_max_tokens),
            temperature=float(temperature or 0.0),
            top_p=float(top_p if top_p is not None else 1.0),
        )
        try:
            stream = engine.chat(messages, images, sampling, loop=asyncio.get_running_loop(), encoded=encoded)
        except QueueFull:
            raise gr.Error("the server is busy (its queue is full): try again in a moment") from None
        except EngineClosed:
            raise gr.Error("the model is shutting down") from None
        except ValueError as err:
            raise gr.Error(str(err)) from None
        text = ""
        try:
            async for delta in stream:
                text += delta
                yield text
        finally:
            stream.cancel()  # a no-op once finished; frees the row when the generator is closed early
        done = stream.finished
        if done is not None and done.finish_reason == "error":
            raise gr.Error(f"generation failed: {done.error}")
        if not text:
            yield ""  # keep the turn: an empty answer, not a missing one

    return respond


def _gradio_major() -> int:
    import gradio as gr

    try:
        return int(str(gr.__version__).split(".")[0])
    except ValueError:
        return 6


def _examples_arg(examples: Sequence[dict] | None) -> list[list[dict]] | None:
    """ChatInterface wants a list of lists (message, then additional inputs) when it has additional
    inputs; the message alone keeps the examples inside the chatbot, clickable."""
    if not examples:
        return None
    out = []
    for ex in examples:
        if isinstance(ex, str):
            ex = {"text": ex, "files": []}
        out.append([{"text": ex.get("text", ""), "files": [str(f) for f in ex.get("files") or []]}])
    return out


def build_chat_ui(engine, *, title: str = "mmlm", examples: Sequence[dict] | None = None, default_max_tokens: int = 64):
    """A ``gr.ChatInterface(multimodal=True)`` on ``engine``: streaming answers, settings
    (temperature, top-p, max new tokens, system prompt), a stop button, ``examples`` (``{"text",
    "files": [path]}``) and a concurrency limit of ``engine.max_batch`` so that several users are
    decoded in one batch. Works with Gradio 5 and 6."""
    import gradio as gr

    ceiling = max(MAX_TOKENS_CEILING, int(default_max_tokens))
    textbox = gr.MultimodalTextbox(
        file_types=["image"],
        file_count="multiple",
        placeholder=TEXTBOX_PLACEHOLDER,
        show_label=False,
    )
    settings = [
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
        gr.Slider(1, ceiling, value=int(default_max_tokens), step=1, label="Max new tokens"),
        gr.Textbox(value="", label="System prompt", placeholder="(the model's default)", lines=2),
    ]
    kwargs: dict[str, Any] = {}
    if _gradio_major() < 6:
        kwargs["type"] = "messages"  # Gradio 6 has only this shape and no `type`
    return gr.ChatInterface(
        chat_fn(engine, default_max_tokens),
        multimodal=True,
        textbox=textbox,
        additional_inputs=settings,
        additional_inputs_accordion="Settings",
        examples=_examples_arg(examples),
        cache_examples=False,
        title=title,
        description="Attach images (in any turn) and ask about them; answers stream as they are generated.",
        concurrency_limit=engine.max_batch,
        **kwargs,
    )


def launch_chat(
    engine, host: str = "127.0.0.1", port: int = 7860, share: bool = False, examples: Sequence[dict] | None = None
) -> None:
    """Build the chat and serve it (blocking) with a queue of ``engine.max_queue`` requests. (Gradio
    copies the examples' files into its cache: their folders need not be served.)"""
    demo = build_chat_ui(engine, examples=examples)
    demo.queue(max_size=engine.max_queue, default_concurrency_limit=engine.max_batch)
    demo.launch(server_name=host, server_port=port, share=share)


# ------------------------------------------------------------------------------------ examples
SHAPES_QUESTIONS = ("what shape is the red object?", "how many objects are there?", "describe the image.")
SHAPES_TYPES = ("shape", "count", "color", "position", "exists")  # the demo's question types, by preference


def examples_for_shapes(image_dir, n: int = 4) -> list[dict]:
    """Example prompts for the shapes demo: up to ``n`` images of ``image_dir``, each with one
    question. Questions come from the split's ``questions.jsonl`` (next to the folder, so they fit
    the image: a shape question, a count, a color, ...) when there is one, else generic ones."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        return []
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
    by_image: dict[str, dict[str, str]] = {}
    qfile = image_dir.parent / "questions.jsonl"
    if qfile.is_file():
        wanted = {p.name for p in images}
        with qfile.open() as f:
            for line in f:
                try:
                    q = json.loads(line)
                except json.JSONDecodeError:
                    continue
                name = Path(str(q.get("image", ""))).name
                if name in wanted and q.get("question"):
                    by_image.setdefault(name, {}).setdefault(str(q.get("type", "")), str(q["question"]))
    out = []
    for i, img in enumerate(images):
        found = by_image.get(img.name, {})
        kind = SHAPES_TYPES[i % len(SHAPES_TYPES)]
        question = found.get(kind) or next((found[t] for t in SHAPES_TYPES if t in found), None)
        if question is None:
            question = next(iter(found.values()), SHAPES_QUESTIONS[i % len(SHAPES_QUESTIONS)])
        out.append({"text": question, "files": [str(img)]})
    return out
