"""The video branch: frames sampled uniformly from a folder (natural order) or a video file, the
frames encoder's token count known before any forward, frame positions that make the order of frames
matter, a video model that trains through ``mmlm train``, reloads with identical logits and answers
through ``mmlm ask --video`` as through ``model.ask``, and bad videos named by sample."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

import mmlm
from mmlm.cli import app
from mmlm.config import Component, parse_config
from mmlm.errors import ConfigError, SampleError
from mmlm.model import build
from mmlm.registry import ENCODERS
from mmlm.video.read import read_video, sample_indices
from tests.helpers import TINY_LLM, tiny_raw

runner = CliRunner()
TINY_FRAME = {
    "type": "timm",
    "model_name": "vit_tiny_patch16_224",
    "img_size": 32,
    "kwargs": {"patch_size": 16, "embed_dim": 32, "depth": 1, "num_heads": 2},
}


def level(frame: Image.Image) -> int:
    """The index a test frame was painted with (its red level / 10)."""
    return int(round(np.asarray(frame)[..., 0].mean() / 10))


def painted(n: int, size: int = 16) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (10 * i, 40, 200)) for i in range(n)]


def test_frames_are_sampled_uniformly_from_a_folder_in_natural_name_order(tmp_path):
    assert sample_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]  # the first and the last included
    assert sample_indices(3, 8) == [0, 1, 2, 2, 2, 2, 2, 2]  # fewer frames: the last repeated
    for i, f in enumerate(painted(20)):
        f.save(tmp_path / f"frame_{i + 1}.png")  # unpadded: frame_10 must come after frame_9
    (tmp_path / "notes.txt").write_text("not a frame")
    assert [level(f) for f in read_video(tmp_path, 8)] == [0, 3, 5, 8, 11, 14, 16, 19]
    short = tmp_path / "short"
    short.mkdir()
    for i, f in enumerate(painted(3)):
        f.save(short / f"{i}.jpg", quality=100)
    assert [level(f) for f in read_video(short, 5)] == [0, 1, 2, 2, 2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SampleError, match="no frame images") as err:
        read_video(tmp_path / "empty", 8)
    assert err.value.reason == "no frames"
    with pytest.raises(SampleError, match="video not found") as err:
        read_video(tmp_path / "gone", 8)
    assert err.value.reason == "missing video"


@pytest.mark.parametrize("container,codec", [("mkv", "ffv1"), ("mp4", "mpeg4")])
def test_frames_are_sampled_uniformly_from_a_video_file(tmp_path, container, codec):
    av = pytest.importorskip("av")
    path = tmp_path / f"clip.{container}"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=10)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for f in painted(20, 32):
            for packet in stream.encode(av.VideoFrame.from_image(f)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    frames = read_video(path, 8)
    assert len(frames) == 8 and frames[0].size == (32, 32) and frames[0].mode == "RGB"
    assert [level(f) for f in frames] == [0, 3, 5, 8, 11, 14, 16, 19]
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    with pytest.raises(SampleError, match="cannot be decoded") as err:
        read_video(tmp_path / "bad.mp4", 8)
    assert err.value.reason == "corrupt video"


def test_a_video_file_without_pyav_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "av", None)  # import av fails
    with pytest.raises(SampleError, match=r"mmlm\[video\]") as err:
        read_video(tmp_path / "clip.mp4", 8)
    assert err.value.reason == "missing dependency"


def frames_encoder(**opts):
    torch.manual_seed(0)
    options = {"image": TINY_FRAME, "num_frames": 4, **opts}
    return ENCODERS.create(Component(type="frames", **options), where="model.encoders.video").eval()


def test_the_token_count_is_known_before_the_forward_and_frame_positions_make_order_matter():
    enc = frames_encoder()
    assert enc.modality == "video" and enc.num_tokens == 4 * 4 and enc.hidden_size == 32  # 4 frames x 2x2 patches
    still = enc.preprocess([Image.new("RGB", (40, 40), (200, 30, 30))])  # one frame, repeated to 4
    assert tuple(still.shape) == (4, 3, 32, 32) and torch.equal(still[0], still[3])
    with torch.no_grad():
        feats = enc(still[None])
    assert tuple(feats.shape) == (1, enc.num_tokens, enc.hidden_size)
    blocks = feats[0].view(4, 4, 32)  # the same frame at positions 0..3
    assert all(not torch.allclose(blocks[0], blocks[k]) for k in (1, 2, 3))

    joint = frames_encoder(frame_position="frame_token")  # a vector per frame and token: places differ too
    assert tuple(joint.frame_pos[0].shape) == (4, 4, 32)
    with torch.no_grad():
        joint_blocks = (joint(still[None])[0] - joint.image(still[:1])[0].repeat(4, 1)).view(4, 4, 32)
    torch.testing.assert_close(joint_blocks, joint.frame_pos[0].detach())  # exactly the table is added

    plain = frames_encoder(frame_position="none")
    with torch.no_grad():
        same = plain(still[None])[0].view(4, 4, 32)
    assert all(torch.equal(same[0], same[k]) for k in (1, 2, 3))

    # a Q-Former is blind to the order of its keys: only the frame positions tell a clip from its reverse
    from mmlm.connectors import build_connector

    torch.manual_seed(0)
    qformer = build_connector(Component(type="qformer", num_queries=4, heads=2), 32, 16).eval()
    clip = enc.preprocess(painted(4, 32))
    with torch.no_grad():
        a, b = qformer(enc(clip[None])), qformer(enc(clip.flip(0)[None]))
        c, d = qformer(plain(clip[None])), qformer(plain(clip.flip(0)[None]))
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(c, d)


def test_the_frames_encoder_options_are_checked_with_their_key_paths():
    def error(video: dict) -> ConfigError:
        raw = tiny_raw()
        raw["model"]["encoders"]["video"] = {"type": "frames", **video}
        raw["model"]["connectors"]["video"] = {"type": "qformer", "num_queries": 4}
        with pytest.raises(ConfigError) as err:
            parse_config(raw)
        return err.value

    assert error({"image": {**TINY_FRAME, "no_such_option": 1}}).path == "model.encoders.video.image.no_such_option"
    assert error({"image": {"type": "timmm"}}).path == "model.encoders.video.image.type"
    assert error({"image": {"model_name": "x"}}).path == "model.encoders.video.image.type"
    whisper = error({"image": {"type": "whisper", "config": {"d_model": 8}}})
    assert whisper.path == "model.encoders.video.image.type" and "image encoder" in str(whisper)
    assert error({"image": {**TINY_FRAME, "tiling": {"max_tiles": 4}}}).path == "model.encoders.video.image.tiling"
    assert error({"image": TINY_FRAME, "select_layers": [-1]}).path == "model.encoders.video.select_layers"
    assert error({"image": TINY_FRAME, "num_frames": 0}).path == "model.encoders.video.num_frames"


def video_raw(world: str, **stage) -> dict:
    return {
        "name": "tiny-video",
        "model": {
            "encoders": {"video": {"type": "frames", "image": TINY_FRAME, "num_frames": 4}},
            "connectors": {"video": {"type": "qformer", "num_queries": 4, "heads": 2}},
            "llm": TINY_LLM,
        },
        "processor": {"max_length": 64},
        "train": {
            "seed": 0,
            "stages": [
                {
                    "name": "qa",
                    "data": [{"format": "clips", "path": world, "n": 6, "seed": 4, "image_size": 32, "task": "qa"}],
                    "objectives": [{"type": "lm"}, {"type": "sea", "modality": "video", "label_key": "query_labels"}],
                    "lr": 1e-2,
                    "steps": 3,
                    "batch_size": 2,
                    **stage,
                }
            ],
        },
    }


def test_a_video_model_trains_through_mmlm_train_reloads_identically_and_answers_through_ask_video(tmp_path):
    world = tmp_path / "world"
    r = runner.invoke(app, ["data", "clips", "--out", str(world), "--n", "6", "--seed", "4", "--image-size", "32"])
    assert r.exit_code == 0, r.output
    f = tmp_path / "video.yaml"
    f.write_text(yaml.safe_dump(video_raw(str(world))))
    r = runner.invoke(app, ["train", str(f), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    losses = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["qa"]["losses"]
    assert set(losses) == {"lm", "sea"} and all(0 < v < 20 for v in losses.values())  # sea reads query_labels

    init, final = mmlm.load(tmp_path / "run" / "init"), mmlm.load(tmp_path / "run" / "final")
    moved = [k for k, v in final.encoders["video"].state_dict().items() if k.startswith("frame_pos")]
    assert moved and all(
        not torch.equal(final.encoders["video"].state_dict()[k], init.encoders["video"].state_dict()[k]) for k in moved
    )  # the frame positions train and are saved

    clips = json.loads((world / "clips.json").read_text())
    folders = [str(world / c["video"]) for c in clips[:2]]
    frames = [Image.open(p) for p in sorted((world / clips[0]["video"]).glob("*.png"))]
    batch = final.processor(
        [[{"role": "user", "content": "<video>\nwhich way does the shape move?"}]] * 2,
        [{"video": [read_video(p, 4)]} for p in folders],
    )
    assert tuple(batch["pixel_values_videos"].shape) == (2, 4, 3, 32, 32)
    assert int((batch["input_ids"] == final.processor.media["video"].token_id).sum()) == 2 * 4
    final.save(tmp_path / "again")
    again = mmlm.load(tmp_path / "again")
    with torch.no_grad():
        logits, reloaded = final(**final.inputs(batch)).logits, again(**again.inputs(batch)).logits
    assert torch.equal(logits, reloaded)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)  # the two clips give two answers' logits

    q = "which way does the shape move?"
    kw = {"max_new_tokens": 4, "temperature": 1.0, "seed": 3}
    want = final.ask(q, video=folders[0], **kw)
    assert want and final.ask(q, video=frames, **kw) == want  # a folder or its frames: the same answer
    args = ["ask", str(tmp_path / "run" / "final"), "--video", folders[0], q]
    r = runner.invoke(app, [*args, "--max-new-tokens", "4", "--temperature", "1", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == want
    bad = runner.invoke(app, ["ask", str(tmp_path / "run" / "final"), "--video", str(tmp_path / "none"), q])
    assert bad.exit_code != 0 and "video not found" in bad.output


def test_bad_video_rows_are_named_by_sample(tmp_path):
    """A missing clip folder, an empty one and a placeholder count that does not match are named with
    their row under on_bad_sample: error and counted under skip; a video file that cannot be decoded
    stops training naming its row; a video row for a model without a video encoder is refused naming
    the row."""
    from mmlm.data.dataset import StageDataset
    from mmlm.data.sources import read_source

    clip = tmp_path / "clip"
    clip.mkdir()
    for i, f in enumerate(painted(4)):
        f.save(clip / f"{i}.png")
    (tmp_path / "empty").mkdir()
    turns = [{"from": "human", "value": "what is it?"}, {"from": "gpt", "value": "red"}]
    rows = [
        {"id": "ok", "video": "clip", "conversations": turns},
        {"id": "gone", "video": "no_such_clip", "conversations": turns},
        {"id": "blank", "video": "empty", "conversations": turns},
        {"id": "two", "video": "clip", "conversations": [{"from": "human", "value": "<video><video> hm"}, turns[1]]},
    ]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    raw = video_raw(str(tmp_path / "w"))
    raw["train"]["stages"][0]["data"] = [{"format": "llava", "path": str(tmp_path / "rows.json")}]
    cfg = parse_config(raw)
    model = build(cfg, texts=["what is it ? red hm"])
    records = read_source(cfg.train.stages[0].data[0])
    with pytest.raises(SampleError) as err:
        StageDataset(records, model.processor, "error")
    assert "rows.json: sample 1 (id gone)" in str(err.value) and "video not found" in str(err.value)
    data = StageDataset(records, model.processor, "skip")
    assert len(data) == 1 and dict(data.skipped) == {"missing video": 1, "no frames": 1, "media count mismatch": 1}
    assert data.media(0)["video"][0][2].getpixel((0, 0))[0] == 20  # frame 2 of 4, read from the folder

    r = runner.invoke(app, ["train", _yaml(tmp_path, raw), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "sample 1 (id gone)" in r.output and "video not found" in r.output

    # a file that is there but cannot be decoded is found when the sample is loaded, and named then
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (tmp_path / "rows.json").write_text(
        json.dumps([rows[0], {"id": "broken", "video": "broken.mp4", "conversations": turns}])
    )
    raw["train"]["stages"][0]["batch_size"] = 2
    r = runner.invoke(app, ["train", _yaml(tmp_path, raw), "--out", str(tmp_path / "run2")])
    assert r.exit_code == 2 and "sample 1 (id broken)" in r.output, r.output
    assert "cannot be decoded" in r.output or "mmlm[video]" in r.output  # without PyAV: the extra to install

    image_only = build(parse_config(tiny_raw()), texts=["what is it ? red"])
    with pytest.raises(SampleError) as err:
        StageDataset(records[:1], image_only.processor, "error")
    assert "sample 0 (id ok)" in str(err.value) and "no video encoder" in str(err.value)
    with pytest.raises(SampleError, match="no 'video' encoder"):
        image_only.ask("what is it?", video=str(clip))


def _yaml(tmp_path, raw) -> str:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    return str(f)
