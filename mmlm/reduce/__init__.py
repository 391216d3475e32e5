"""Token reduction: one reducer per file, registered by exact name in ``mmlm.registry.REDUCERS``."""

from mmlm.reduce._base import Reducer, ReducerOptions, build_reducer

__all__ = ["Reducer", "ReducerOptions", "build_reducer"]
