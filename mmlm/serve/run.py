"""What ``mmlm serve`` and ``mmlm chat`` run: load a checkpoint, start its engine, serve it."""

from __future__ import annotations

from pathlib import Path

from mmlm.serve.engine import Engine
from mmlm.serve.limits import ServeLimits


def _missing(what: str) -> ImportError:
    return ImportError(f"{what} is not installed; install the serving extras: pip install 'mmlm[serve]'")


def start_engine(checkpoint: str | Path, limits: ServeLimits, device: str | None = None):
    """The checkpoint's model on ``device`` and an engine over it, with the limits' batching."""
    from mmlm.checkpoint import load

    model = load(checkpoint)
    if device:
        model.to(device)
    model.eval()
    engine = Engine(
        model, max_batch=limits.max_batch, window_s=limits.batch_window_ms / 1000, max_queue=limits.max_queue
    )
    return model, engine


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    model_name: str | None = None,
    ui: bool = True,
    device: str | None = None,
) -> None:
    """The OpenAI-compatible API (and the chat UI at /ui) until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise _missing("uvicorn") from None
    from mmlm.serve.api import create_app

    limits = limits or ServeLimits()
    model, engine = start_engine(checkpoint, limits, device)
    app = create_app(engine, model_name or model.config.name, limits, api_key=api_key, ui=ui)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()


def chat(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    limits: ServeLimits | None = None,
    examples_dir: str | Path | None = None,
    device: str | None = None,
) -> None:
    """The Gradio chat alone until interrupted."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise _missing("gradio") from None
    from mmlm.serve.ui import examples_for_shapes, launch_chat

    limits = limits or ServeLimits()
    _, engine = start_engine(checkpoint, limits, device)
    examples = examples_for_shapes(examples_dir) if examples_dir else None
    try:
        launch_chat(engine, host=host, port=port, share=share, examples=examples)
    finally:
        engine.close()
