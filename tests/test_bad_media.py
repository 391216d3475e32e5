"""Bad media through the training data path: a WAV truncated mid-data, zero-length audio (a WAV
with a header and no samples, a 0-byte file), an unreadable video file, a video with no frames (an
empty frames folder, a container with a video stream and no frames). Under ``on_bad_sample:
error`` each stops the stage naming its row and file; under ``skip`` each is counted by reason and
training goes on with the good rows."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mmlm.audio.whisper_encoder import EXAMPLE, read_audio  # noqa: E402
from mmlm.config import parse_config  # noqa: E402
from mmlm.data.dataset import StageDataset  # noqa: E402
from mmlm.data.sources import read_source  # noqa: E402
from mmlm.errors import SampleError  # noqa: E402
from mmlm.model import build  # noqa: E402
from mmlm.train.batches import StageBatches  # noqa: E402
from tests.helpers import TINY_LLM  # noqa: E402

soundfile = pytest.importorskip("soundfile")
SR = 16000
FRAME = {
    "type": "timm",
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
}
TURNS = [{"from": "human", "value": "what is it ?"}, {"from": "gpt", "value": "a beep"}]


def tone(seconds: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def truncated_wav(path) -> None:
    """A 16-bit WAV cut partway through its samples (mid-sample, too): the header still declares them all."""
    soundfile.write(path, tone(), SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 1])


def frameless_video(path) -> bool:
    """A container with a video stream and not one frame; False without PyAV."""
    try:
        import av
    except ImportError:
        return False
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        out.start_encoding()
    return True


def test_bad_sound_files_are_sample_errors_that_name_the_file(tmp_path):
    truncated_wav(tmp_path / "cut.wav")
    with pytest.raises(SampleError, match=r"cut\.wav is truncated: its data chunk declares 12800 bytes") as err:
        read_audio(tmp_path / "cut.wav", SR)
    assert err.value.reason == "corrupt audio"
    soundfile.write(tmp_path / "none.wav", np.zeros(0, np.float32), 8000)  # at 8 kHz: no samples to resample
    with pytest.raises(SampleError, match=r"none\.wav holds no samples") as err:
        read_audio(tmp_path / "none.wav", SR)
    assert err.value.reason == "empty audio"
    (tmp_path / "nothing.wav").write_bytes(b"")
    with pytest.raises(SampleError, match=r"nothing\.wav is an empty file") as err:
        read_audio(tmp_path / "nothing.wav", SR)
    assert err.value.reason == "empty audio"
    soundfile.write(tmp_path / "whole.wav", tone(), SR, subtype="PCM_16")
    assert read_audio(tmp_path / "whole.wav", SR).shape == (len(tone()),)  # a complete WAV is no error


def bad_rows(tmp_path) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """Rows of good and bad media, and for each bad row's id its reason and what its message says."""
    soundfile.write(tmp_path / "tone.wav", tone(), SR)
    truncated_wav(tmp_path / "cut.wav")
    soundfile.write(tmp_path / "none.wav", np.zeros(0, np.float32), SR)
    (tmp_path / "nothing.wav").write_bytes(b"")
    (tmp_path / "clip").mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 40, 200)).save(tmp_path / "clip" / f"{i}.png")
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (tmp_path / "blank").mkdir()
    rows = [
        {"id": "tone", "audio": "tone.wav", "conversations": TURNS},
        {"id": "cut", "audio": "cut.wav", "conversations": TURNS},
        {"id": "none", "audio": "none.wav", "conversations": TURNS},
        {"id": "nothing", "audio": "nothing.wav", "conversations": TURNS},
        {"id": "clip", "video": "clip", "conversations": TURNS},
        {"id": "garbage", "video": "garbage.mp4", "conversations": TURNS},
        {"id": "blank", "video": "blank", "conversations": TURNS},
    ]
    # more good rows than bad: a bad sample is replaced by a draw further on, which may be bad too
    rows += [{"id": f"tone{k}", "audio": "tone.wav", "conversations": TURNS} for k in range(3)]
    rows += [{"id": f"clip{k}", "video": "clip", "conversations": TURNS} for k in range(3)]
    have_av = frameless_video(tmp_path / "frameless.avi")
    bad = {
        "cut": ("corrupt audio", "cut.wav is truncated"),
        "none": ("empty audio", "none.wav holds no samples"),
        "nothing": ("empty audio", "nothing.wav is an empty file"),
        "garbage": ("corrupt video", "garbage.mp4 cannot be decoded")
        if have_av
        else ("missing dependency", "mmlm[video]"),
        "blank": ("no frames", "blank is a folder with no frame images"),
    }
    if have_av:
        rows.append({"id": "frameless", "video": "frameless.avi", "conversations": TURNS})
        bad["frameless"] = ("no frames", "frameless.avi has no frames")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    return rows, bad


def raw_config(tmp_path, policy: str) -> dict:
    return {
        "name": "bad-media",
        "model": {
            "encoders": {
                "audio": {"type": "whisper", **EXAMPLE},
                "video": {"type": "frames", "image": FRAME, "num_frames": 2},
            },
            "connectors": {"audio": {"type": "mlp"}, "video": {"type": "mlp"}},
            "llm": TINY_LLM,
        },
        "processor": {"max_length": 64},
        "train": {
            "seed": 0,
            "stages": [
                {
                    "name": "media",
                    "data": [{"format": "llava", "path": str(tmp_path / "rows.json"), "image_root": str(tmp_path)}],
                    "trainable": ["connectors.*"],
                    "lr": 1e-3,
                    "steps": 2,
                    "batch_size": 7,  # two batches draw every row of the first epoch
                    "on_bad_sample": policy,
                }
            ],
        },
    }


def test_each_bad_medium_stops_the_stage_under_error_naming_its_row_and_file(tmp_path):
    rows, bad = bad_rows(tmp_path)
    cfg = parse_config(raw_config(tmp_path, "error"))
    torch.manual_seed(0)
    model = build(cfg, texts=["what is it ? a beep"])
    records = read_source(cfg.train.stages[0].data[0])
    ids = [r["id"] for r in rows]
    good = [records[ids.index("tone")], records[ids.index("clip")]]
    for name, (reason, says) in bad.items():
        row = ids.index(name)
        with pytest.raises(SampleError) as err:  # found up front (a folder's listing) or when loaded
            data = StageDataset([*good, records[row]], model.processor, "error")
            StageBatches(data, 3, 0, "media", 0, "train.stages.0", "error")(0)  # draws all three
        assert f"rows.json: sample {row} (id {name})" in str(err.value), str(err.value)
        assert says in str(err.value) and err.value.reason == reason


def test_bad_media_are_counted_under_skip_and_training_goes_on(tmp_path):
    from mmlm.train.runner import train

    _, bad = bad_rows(tmp_path)
    train(parse_config(raw_config(tmp_path, "skip")), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["media"]["data"]
    want: dict[str, int] = {}
    for reason, _ in bad.values():
        want[reason] = want.get(reason, 0) + 1
    assert metrics["skipped_by_reason"] == want
    assert metrics["used"] == 8 and metrics["skipped"] == len(bad)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
