"""The Whisper audio encoder: its features are transformers' own (from a config and from a saved
checkpoint), sound files are read and resampled, an image+audio model takes ``<audio>`` placeholders
whose clips change its answer, and ``mmlm ask --audio`` answers as ``model.ask`` does."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmlm.audio.whisper_encoder import EXAMPLE, read_audio  # noqa: E402
from mmlm.config import Component, parse_config  # noqa: E402
from mmlm.errors import ConfigError, SampleError  # noqa: E402
from mmlm.model import build  # noqa: E402
from mmlm.registry import ENCODERS  # noqa: E402
from tests.helpers import tiny_raw  # noqa: E402

soundfile = pytest.importorskip("soundfile")
SR = 16000


def tone(freq: float, seconds: float = 0.4, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encoder(**opts):
    return ENCODERS.create(Component(type="whisper", **opts), where="model.encoders.audio")


def test_features_and_hidden_states_are_transformers_whisper(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    fields = {**EXAMPLE["config"], "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64}
    ref = WhisperModel(WhisperConfig(vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **fields)).eval()
    ref.save_pretrained(tmp_path / "w")
    n = fields["max_source_positions"] * 2 * 160
    fe = WhisperFeatureExtractor(feature_size=fields["num_mel_bins"], chunk_length=n / SR)
    fe.save_pretrained(tmp_path / "w")
    fe.n_samples, fe.nb_max_frames = n, n // 160  # the reference extractor, with integral sizes

    enc = encoder(path=str(tmp_path / "w"), select_layers=[-2]).eval()
    assert enc.pretrained and enc.num_tokens == fields["max_source_positions"] and enc.hidden_size == 32
    wave = tone(440)
    feats = enc.preprocess(wave)
    want = fe(wave, sampling_rate=SR, return_tensors="pt").input_features[0]
    torch.testing.assert_close(feats, want)
    with torch.no_grad():
        got = enc(feats[None])
        hs = ref.encoder(feats[None], output_hidden_states=True).hidden_states
    torch.testing.assert_close(got, hs[-2])
    assert not torch.allclose(enc.preprocess(tone(880)), feats)  # the pitch reaches the features


def test_a_config_encoder_pads_or_cuts_to_its_window_and_resamples_pairs():
    enc = encoder(**EXAMPLE)
    frames = EXAMPLE["config"]["max_source_positions"] * 2
    assert enc.preprocess(tone(440, 0.1)).shape == (16, frames)
    assert enc.preprocess(tone(440, 3.0)).shape == (16, frames)
    at8k, at16k = enc.preprocess((tone(440, 0.4, 8000), 8000)), enc.preprocess(tone(440, 0.4))
    # the same pitch: the same loudest mel band in every frame, and nearly the same spectrum
    assert torch.equal(at8k.argmax(0), at16k.argmax(0))
    assert (at8k - at16k).abs().mean() < 0.1
    with pytest.raises(SampleError, match="empty"):
        enc.preprocess(np.zeros(0, dtype=np.float32))


def test_sound_files_are_read_mono_at_the_rate_and_a_bad_one_is_a_sample_error(tmp_path):
    stereo = np.stack([tone(440, 0.5, 8000), tone(440, 0.5, 8000)], axis=1)
    soundfile.write(tmp_path / "a.wav", stereo, 8000)
    soundfile.write(tmp_path / "a.flac", tone(440, 0.5), SR)
    wav = read_audio(tmp_path / "a.wav", SR)
    assert wav.ndim == 1 and abs(len(wav) - SR // 2) <= 1
    assert read_audio(tmp_path / "a.flac", SR).shape == (SR // 2,)
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    with pytest.raises(SampleError, match="cannot be decoded"):
        read_audio(tmp_path / "bad.wav")
    with pytest.raises(SampleError, match="not found"):
        read_audio(tmp_path / "none.wav")


def audio_model():
    raw = tiny_raw()
    raw["model"]["encoders"]["audio"] = {"type": "whisper", **EXAMPLE}
    raw["model"]["connectors"]["audio"] = {"type": "qformer", "num_queries": 8}
    torch.manual_seed(0)
    return build(parse_config(raw), texts=["what sound is this ? beep high low one two"])


def test_an_image_and_audio_model_takes_audio_placeholders_and_the_clip_matters(tmp_path):
    from PIL import Image

    model = audio_model().eval()
    spec = model.processor.media["audio"]
    assert spec.num_tokens == 8 and spec.batch_key == "input_features"
    img = Image.new("RGB", (32, 32), (200, 0, 0))
    conv = [[{"role": "user", "content": "<audio>\n<image>\nwhat sound is this ?"}]]
    a = model.processor(conv, [{"audio": [tone(300)], "image": [img]}])
    b = model.processor(conv, [{"audio": [tone(3000)], "image": [img]}])
    assert int((a["input_ids"] == spec.token_id).sum()) == 8
    with torch.no_grad():
        la, lb = model(**model.inputs(a)).logits, model(**model.inputs(b)).logits
    assert not torch.allclose(la, lb, atol=1e-4)
    with pytest.raises(SampleError, match="placeholder"):
        model.processor.encode(conv[0], {"image": [img]})  # an <audio> without its clip


def audio_raw(audio_connector: dict, image_connector: dict | None = None) -> dict:
    raw = tiny_raw()
    raw["model"]["encoders"]["audio"] = {"type": "whisper", **EXAMPLE}
    raw["model"]["connectors"]["audio"] = audio_connector
    if image_connector is not None:
        raw["model"]["connectors"]["image"] = image_connector
    return raw


def media_tokens_per_item(model, prompt: str, media: dict) -> dict[str, tuple[int, int]]:
    """Per modality: the placeholder ids the processor wrote for one item, and the tokens its
    connector gave in the forward."""
    batch = model.processor([[{"role": "user", "content": prompt}]], [media])
    with torch.no_grad():
        out = model(**model.inputs(batch))
    return {
        name: (int((batch["input_ids"] == model.processor.media[name].token_id).sum()), out.media_tokens[name].shape[1])
        for name in media
    }


def test_an_audio_qformer_has_8_queries_by_default_an_image_one_32_and_num_queries_wins(tmp_path):
    from PIL import Image

    from mmlm.checkpoint import load

    img = Image.new("RGB", (32, 32), (200, 0, 0))
    media = {"audio": [tone(440)], "image": [img]}
    torch.manual_seed(0)
    model = build(parse_config(audio_raw({"type": "qformer"}, {"type": "qformer"})), texts=["hi"]).eval()
    assert media_tokens_per_item(model, "<audio><image> hi", media) == {"audio": (8, 8), "image": (32, 32)}
    model.save(tmp_path / "ck")  # the config keeps num_queries unset; the reload resolves it the same way
    assert "num_queries" not in (tmp_path / "ck" / "mmlm.yaml").read_text()
    assert media_tokens_per_item(load(tmp_path / "ck").eval(), "<audio><image> hi", media) == {
        "audio": (8, 8),
        "image": (32, 32),
    }

    explicit = audio_raw({"type": "qformer", "num_queries": 5}, {"type": "qformer", "num_queries": 3})
    model = build(parse_config(explicit), texts=["hi"]).eval()
    assert media_tokens_per_item(model, "<audio><image> hi", media) == {"audio": (5, 5), "image": (3, 3)}


def test_an_audio_mlp_over_pooled_frames_gets_as_many_placeholders_as_it_gives_tokens():
    torch.manual_seed(0)
    model = build(parse_config(audio_raw({"type": "mlp", "pool": 4})), texts=["hi"]).eval()
    frames = model.encoders["audio"].num_tokens
    assert frames == 25  # not a multiple of 4: the last window holds one frame
    assert model.processor.media["audio"].num_tokens == 7
    got = media_tokens_per_item(model, "<audio> hi", {"audio": [tone(440)]})
    assert got == {"audio": (7, 7)}


def test_mmlm_ask_audio_answers_as_model_ask(tmp_path):
    from typer.testing import CliRunner

    from mmlm.checkpoint import load
    from mmlm.cli import app

    model = audio_model()
    model.save(tmp_path / "ck")
    soundfile.write(tmp_path / "t.wav", tone(660), SR)
    loaded = load(tmp_path / "ck")
    want = loaded.ask("what sound is this ?", audio=str(tmp_path / "t.wav"), max_new_tokens=4, temperature=1.0, seed=3)
    assert want
    args = ["ask", str(tmp_path / "ck"), "--audio", str(tmp_path / "t.wav"), "what sound is this ?"]
    out = CliRunner().invoke(app, [*args, "--max-new-tokens", "4", "--temperature", "1", "--seed", "3"])
    assert out.exit_code == 0, out.output
    assert out.output.strip() == want
    bad = CliRunner().invoke(app, ["ask", str(tmp_path / "ck"), "--audio", str(tmp_path / "none.wav"), "hi"])
    assert bad.exit_code != 0 and "audio not found" in bad.output


def test_tiling_is_refused_on_an_audio_encoder():
    raw = tiny_raw()
    raw["model"]["encoders"]["audio"] = {"type": "whisper", **EXAMPLE, "tiling": {"max_tiles": 4}}
    raw["model"]["connectors"]["audio"] = {"type": "mlp"}
    with pytest.raises(ConfigError, match="tiling"):
        parse_config(raw)


def test_llava_rows_with_audio_train_the_audio_branch_and_bad_rows_are_named(tmp_path):
    """Rows with "audio" (a path under image_root, its <audio> placeholder added before the first
    turn when absent) load into input_features; a missing file and a placeholder count that does not
    match are skipped with their reasons; a few steps move the audio connector's weights."""
    import json

    from mmlm.checkpoint import load
    from mmlm.train.runner import train

    for name, f in (("low.wav", 300), ("high.wav", 3000)):
        soundfile.write(tmp_path / name, tone(f), SR)
    rows = [
        {
            "id": "a",
            "audio": "low.wav",
            "conversations": [{"from": "human", "value": "what pitch ?"}, {"from": "gpt", "value": "low"}],
        },
        {
            "id": "b",
            "audio": "high.wav",
            "conversations": [{"from": "human", "value": "<audio>\nwhat pitch ?"}, {"from": "gpt", "value": "high"}],
        },
        {
            "id": "c",
            "audio": "gone.wav",
            "conversations": [{"from": "human", "value": "what pitch ?"}, {"from": "gpt", "value": "low"}],
        },
        {
            "id": "d",
            "audio": "low.wav",
            "conversations": [{"from": "human", "value": "<audio><audio> pitch ?"}, {"from": "gpt", "value": "low"}],
        },
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    raw = tiny_raw()
    raw["model"]["encoders"]["audio"] = {"type": "whisper", **EXAMPLE}
    raw["model"]["connectors"]["audio"] = {"type": "qformer", "num_queries": 8}
    raw["train"] = {
        "seed": 0,
        "stages": [
            {
                "name": "audio",
                "data": [{"format": "llava", "path": str(tmp_path / "rows.json"), "image_root": str(tmp_path)}],
                "trainable": ["connectors.audio.*"],
                "lr": 1e-2,
                "steps": 3,
                "batch_size": 2,
                "on_bad_sample": "skip",
            }
        ],
    }
    cfg = parse_config(raw)
    train(cfg, tmp_path / "run")
    before = load(tmp_path / "run" / "init").connectors["audio"].state_dict()  # the run's own starting point
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["audio"]["data"]
    assert metrics["used"] == 2 and metrics["skipped_by_reason"] == {"missing audio": 1, "media count mismatch": 1}
    after = load(tmp_path / "run" / "final").connectors["audio"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    image_before = load(tmp_path / "run" / "init").connectors["image"].state_dict()
    image_after = load(tmp_path / "run" / "final").connectors["image"].state_dict()
    assert all(torch.equal(image_before[k], image_after[k]) for k in image_before)  # not trainable
