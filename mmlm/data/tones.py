"""A synthetic audio world beside the shapes world: short clips of beeps, each clip one pitch band,
a number of beeps, a contour and a timbre, with captions and questions (LLaVA rows with ``"audio"``).

- pitch: ``low`` (about 220 Hz), ``mid`` (440), ``high`` (880), with a little jitter;
- beeps: one, two or three, separated by silence;
- contour: ``steady``, ``rising`` or ``falling`` (the pitch glides a fifth over each beep);
- timbre: ``sine``, ``square`` or ``saw`` (band-limited: harmonics under the Nyquist frequency).

``generate(out, n, seed)`` writes ``audio/*.wav`` (16 kHz mono), ``captions.json`` and ``qa.json``
(LLaVA rows) and ``questions.jsonl`` (one question per line with its type and answer), deterministic
by seed; use disjoint seeds for held-out splits. Every answer follows from the clip's parameters,
which ``clips.json`` keeps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmlm.modalities import AUDIO_PLACEHOLDER

SR = 16000
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}
CONTOURS = ("steady", "rising", "falling")
TIMBRES = ("sine", "square", "saw")
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {  # by question type ("beeps", not "count": the shapes world's counts are objects)
    "pitch": "is the sound low, mid or high?",
    "beeps": "how many beeps are there?",
    "contour": "is the pitch steady, rising or falling?",
    "timbre": "is the timbre sine, square or saw?",
}


def _wave(timbre: str, phase: np.ndarray, f_max: float) -> np.ndarray:
    """One period-normalised waveform from the running phase (cycles), band-limited to SR / 2."""
    if timbre == "sine":
        return np.sin(2 * np.pi * phase)
    harmonics = int((SR / 2) // max(f_max, 1.0))
    out = np.zeros_like(phase)
    for k in range(1, harmonics + 1):
        if timbre == "square" and k % 2 == 0:
            continue
        out += np.sin(2 * np.pi * k * phase) / k
    return out * (4 / np.pi if timbre == "square" else 2 / np.pi)


def render(pitch: str, count: int, contour: str, timbre: str, rng: np.random.Generator, seconds: float = 0.5):
    """The clip: ``count`` beeps of equal length with gaps, each gliding per ``contour``."""
    n = int(seconds * SR)
    clip = np.zeros(n, dtype=np.float32)
    f0 = PITCHES[pitch] * float(rng.uniform(0.95, 1.05))
    slot = n // count
    beep = int(slot * 0.6)
    ratio = {"steady": 1.0, "rising": 1.5, "falling": 1 / 1.5}[contour]
    for b in range(count):
        t = np.arange(beep) / SR
        freq = f0 * ratio ** (t / t[-1])
        phase = np.cumsum(freq) / SR
        env = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.005)  # 5 ms ramps: no clicks
        start = b * slot + (slot - beep) // 2
        clip[start : start + beep] = 0.4 * env * _wave(timbre, phase, float(freq.max()))
    return clip


def caption(p: dict) -> str:
    noun = "beep" if p["count"] == 1 else "beeps"
    return f"{COUNTS[p['count']]} {p['pitch']} {p['timbre']} {noun}, {p['contour']}."


def answer(p: dict, kind: str) -> str:
    return COUNTS[p["count"]] if kind == "beeps" else p[kind]


def generate(out: str | Path, n: int, seed: int = 0) -> dict:
    import soundfile

    out = Path(out)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    clips, captions, qa, flat = [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        p = {
            "pitch": str(rng.choice(list(PITCHES))),
            "count": int(rng.integers(1, 4)),
            "contour": str(rng.choice(CONTOURS)),
            "timbre": str(rng.choice(TIMBRES)),
        }
        name = f"audio/{seed}_{i:06d}.wav"
        soundfile.write(out / name, render(p["pitch"], p["count"], p["contour"], p["timbre"], rng), SR)
        cid = f"{seed}-{i}"
        clips.append({"id": cid, "audio": name, **p})
        human = f"{AUDIO_PLACEHOLDER}\ndescribe the sound."
        captions.append(
            {
                "id": cid,
                "audio": name,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption(p)}],
            }
        )
        conv = []
        for k, kind in enumerate(rng.permutation(list(QUESTIONS))):
            conv.append({"from": "human", "value": (f"{AUDIO_PLACEHOLDER}\n" if k == 0 else "") + QUESTIONS[kind]})
            conv.append({"from": "gpt", "value": answer(p, str(kind))})
            flat.append({"audio": name, "question": QUESTIONS[kind], "answer": answer(p, str(kind)), "type": str(kind)})
        qa.append({"id": cid, "audio": name, "conversations": conv})
    (out / "clips.json").write_text(json.dumps(clips, indent=1))
    (out / "captions.json").write_text(json.dumps(captions, indent=1))
    (out / "qa.json").write_text(json.dumps(qa, indent=1))
    with open(out / "questions.jsonl", "w") as f:
        for row in flat:
            f.write(json.dumps(row) + "\n")
    info = {"seed": seed, "n": n, "questions": len(flat)}
    (out / "world.json").write_text(json.dumps(info))
    return info
