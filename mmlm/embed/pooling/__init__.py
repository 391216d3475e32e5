"""Poolings: hidden states ``[B, T, D]`` and their mask -> one vector per sequence; one file each,
registered by exact name in ``mmlm.registry.POOLINGS``."""

from mmlm.embed.pooling._base import Pooling, PoolingOptions, build_pooling

__all__ = ["Pooling", "PoolingOptions", "build_pooling"]
