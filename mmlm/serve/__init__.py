"""Serving: one engine (``mmlm.serve.engine``) behind the Gradio chat and the OpenAI-compatible API."""

from mmlm.serve.engine import ChatStream, Engine, Finished, QueueFull, Sampling

__all__ = ["ChatStream", "Engine", "Finished", "QueueFull", "Sampling"]
