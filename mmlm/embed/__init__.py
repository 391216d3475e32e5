"""Embeddings from a multimodal LLM: pooling (one per file in ``pooling/``), prompts, extraction and
retrieval metrics."""
