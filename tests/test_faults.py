"""Real SIGKILLs, one of them between the two renames of a state save: every resume in a fresh
process continues from the newest complete state, removes the leftovers, and the run ends with the
weights of an uninterrupted one (benchmarks/faults.py, with fewer kills)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sigkills_at_random_and_mid_save_lose_nothing(tmp_path):
    spec = importlib.util.spec_from_file_location("faults", ROOT / "benchmarks" / "faults.py")
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    r = faults.campaign(tmp_path, kills=3, steps=150, log=lambda *a: None)
    assert r["kills"] == 3 and r["identical"] and r["leftovers"] == []
    assert r["resumed_at"] == 9  # the newest complete state (the step-9 save it was killed in), not step 0
