"""Every seed of a run comes from one place: (run seed, stage, position, purpose) -> seed. A resumed
run, a run with DataLoader workers, and an uninterrupted one draw the same numbers at the same
position; different purposes at one position draw independent streams."""

from __future__ import annotations

import hashlib

# The purposes the trainer has always seeded keep the linear forms the 0.1 release used, so a run it
# started resumes with the same random streams, and its published figures reproduce; a new purpose
# (an objective's own draws) gets a hash of all four parts.
_LINEAR = {"init": (1, 0), "order": (1_000_003, 10_007), "step": (7_919, 104_729)}


def derive_seed(run_seed: int, stage: int, position: int, purpose: str) -> int:
    """The seed for ``purpose`` (``init``, ``order``, ``step``, an objective's own) at ``position``
    (an epoch, an optimizer step, a micro-batch) of the stage with index ``stage``."""
    if purpose in _LINEAR:
        a, b = _LINEAR[purpose]
        return run_seed * a + stage * b + position
    key = f"{run_seed}\x1f{stage}\x1f{position}\x1f{purpose}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
