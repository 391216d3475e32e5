"""Every seed of a run comes from one place: (run seed, stage, position, purpose) -> seed. A resumed
run, a run with DataLoader workers, and an uninterrupted one draw the same numbers at the same
position; different purposes at one position draw independent ones."""

from __future__ import annotations

import hashlib


def derive_seed(run_seed: int, stage: str, position: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` (``order``, ``step``, ``init``, an objective's own) at
    ``position`` (an epoch, an optimizer step, a micro-batch) of ``stage``."""
    key = f"{run_seed}\x1f{stage}\x1f{position}\x1f{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
