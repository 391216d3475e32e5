"""The tones world: deterministic by seed, every answer true of its clip (beeps counted from the
envelope, pitch and contour from the spectrum, timbre from the harmonics), rows read by the llava
reader into an audio model's batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")

from mmlm.data.tones import SR, generate  # noqa: E402


def beeps(clip: np.ndarray, block: int = 80) -> list[np.ndarray]:
    """The sounding runs of a clip, found on its envelope (the peak of each 5 ms block)."""
    n = len(clip) // block
    on = np.abs(clip[: n * block]).reshape(n, block).max(axis=1) > 1e-3
    runs, start = [], None
    for i, v in enumerate([*on, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append(clip[start * block : i * block])
            start = None
    return runs


def peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=1 << 15))
    return float(np.fft.rfftfreq(1 << 15, 1 / SR)[spec.argmax()])


def band(x: np.ndarray, f: float) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=1 << 15))
    freqs = np.fft.rfftfreq(1 << 15, 1 / SR)
    return float(spec[(freqs > f * 0.93) & (freqs < f * 1.07)].max())


def test_every_answer_is_true_of_its_clip(tmp_path):
    generate(tmp_path, 24, seed=3)
    clips = json.loads((tmp_path / "clips.json").read_text())
    assert {c["pitch"] for c in clips} == {"low", "mid", "high"} and {c["count"] for c in clips} == {1, 2, 3}
    for c in clips:
        audio, sr = soundfile.read(tmp_path / c["audio"])
        assert sr == SR
        parts = beeps(audio)
        assert len(parts) == c["count"], c
        b = parts[0]
        third = len(b) // 3
        start, end = peak_hz(b[:third]), peak_hz(b[-third:])
        if c["contour"] == "steady":
            f0 = peak_hz(b)
            assert {"low": f0 < 300, "mid": 300 < f0 < 650, "high": f0 > 650}[c["pitch"]], (c, f0)
            ratio2, ratio3 = band(b, 2 * f0) / band(b, f0), band(b, 3 * f0) / band(b, f0)
            kind = "sine" if ratio3 < 0.05 else "square" if ratio2 < 0.05 else "saw"
            assert kind == c["timbre"], (c, ratio2, ratio3)
        else:
            assert (end > start * 1.2) == (c["contour"] == "rising"), (c, start, end)
            assert (end < start / 1.2) == (c["contour"] == "falling"), (c, start, end)


def test_the_world_is_deterministic_by_seed(tmp_path):
    generate(tmp_path / "a", 4, seed=1)
    generate(tmp_path / "b", 4, seed=1)
    generate(tmp_path / "c", 4, seed=2)
    a, b, c = (json.loads((tmp_path / d / "clips.json").read_text()) for d in "abc")
    assert a == b and a != c
    wa, _ = soundfile.read(tmp_path / "a" / a[0]["audio"])
    wb, _ = soundfile.read(tmp_path / "b" / b[0]["audio"])
    assert np.array_equal(wa, wb)


def test_rows_read_into_an_audio_models_batches(tmp_path):
    import torch

    from mmlm.audio.whisper_encoder import EXAMPLE
    from mmlm.config import DataSource, parse_config
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import read_source
    from mmlm.model import build
    from tests.helpers import tiny_raw

    generate(tmp_path, 3, seed=0)
    raw = tiny_raw()
    raw["model"]["encoders"]["audio"] = {"type": "whisper", **EXAMPLE}
    raw["model"]["connectors"]["audio"] = {"type": "qformer", "num_queries": 8}
    torch.manual_seed(0)
    model = build(parse_config(raw), texts=["describe the sound . how many beeps are there ? one two three"])
    src = DataSource(format="llava", path=str(tmp_path / "questions.jsonl"), image_root=str(tmp_path))
    records = read_source(src)
    assert len(records) == 12 and all(len(r.audios) == 1 for r in records)
    data = StageDataset(records, model.processor)
    batch = data.collate([data.load(0), data.load(1)])
    assert batch["input_features"].shape[0] == 2
    assert int((batch["input_ids"] == model.processor.media["audio"].token_id).sum()) == 2 * 8


def test_the_tones_format_generates_on_first_use_and_refuses_another_world_at_its_path(tmp_path):
    from mmlm.config import DataSource
    from mmlm.data.sources import read_source

    recs = read_source(DataSource(format="tones", path=str(tmp_path / "w"), n=3, seed=0, task="questions"))
    assert len(recs) == 12 and {r.info["question_types"][0] for r in recs} == {"pitch", "beeps", "contour", "timbre"}
    qa = read_source(DataSource(format="tones", path=str(tmp_path / "w"), n=3, seed=0, task="qa"))
    assert len(qa) == 3 and sum(m["role"] == "assistant" for m in qa[0].messages) == 4
    with pytest.raises(ValueError, match="holds a tones world"):
        read_source(DataSource(format="tones", path=str(tmp_path / "w"), n=4, seed=0))


def test_accuracy_by_modality_weights_each_question_type_by_its_count():
    from mmlm.demo import modality_accuracy

    result = {
        "by_type": {"color": 1.0, "shape": 0.5, "pitch": 0.25, "beeps": 1.0, "all": 0.7},
        "n_by_type": {"color": 30, "shape": 10, "pitch": 40, "beeps": 10},
    }
    got = modality_accuracy(result)
    assert got == {"image": {"accuracy": 0.875, "n": 40}, "audio": {"accuracy": 0.4, "n": 50}}
