"""Images in every mode and state a user's data holds: huge ones refused before decoding, broken
ones a sample error that skip counts once, 16-bit and float ones rescaled, transparency on white."""

import json
import struct
import zlib

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from mmlm.cli import app
from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.errors import SampleError
from mmlm.images import load_image, to_rgb
from mmlm.model import build
from mmlm.train.runner import train
from tests.helpers import TEXTS, tiny_raw


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds none: cheap to write, fatal to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path):
    (tmp_path / "big.png").write_bytes(png_header(4000, 3000))
    with pytest.raises(SampleError) as err:
        load_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert err.value.reason == "image too large" and "4000x3000" in str(err.value)
    with pytest.raises(SampleError) as err:  # under the limit it is decoded, and the empty data shows
        load_image(tmp_path / "big.png", max_pixels=20_000_000)
    assert err.value.reason == "corrupt image"


def test_a_pillow_decompression_bomb_is_a_sample_error(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))  # 400 M pixels: Pillow's own error
    with pytest.raises(SampleError) as err:
        load_image(tmp_path / "bomb.png", max_pixels=10**12)
    assert err.value.reason == "image too large"


def test_a_truncated_image_is_a_corrupt_sample(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError) as err:
        load_image(tmp_path / "cut.png")
    assert err.value.reason == "corrupt image" and "cut.png" in str(err.value)


def test_sixteen_bit_and_float_images_are_rescaled_not_clipped(tmp_path):
    grey16 = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    grey16.save(tmp_path / "g16.png")
    for im in (grey16, Image.open(tmp_path / "g16.png")):
        assert np.asarray(to_rgb(im))[0, 0].tolist() == [128, 128, 128]
    floats = Image.fromarray(np.full((4, 4), 0.25, dtype=np.float32), "F")
    assert np.asarray(to_rgb(floats))[0, 0].tolist() == [64, 64, 64]
    assert np.asarray(to_rgb(Image.new("L", (2, 2), 200)))[0, 0].tolist() == [200, 200, 200]


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    out = np.asarray(to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [255, 0, 0]
    half = np.asarray(to_rgb(Image.new("LA", (1, 1), (0, 128))))
    assert half[0, 0].tolist() == [127, 127, 127]


@pytest.fixture()
def bad_run(tmp_path):
    """A run whose data holds one image that passes the up-front check (the file exists) and fails
    when decoded."""
    raw = tiny_raw(str(tmp_path / "shapes"), n=6, steps=3, on_bad_sample="skip")
    raw["train"]["stages"][0]["on_bad_sample"] = "skip"
    cfg = parse_config(raw)
    from mmlm.data.sources import read_source

    read_source(cfg.train.stages[0].data[0])  # generate the world
    first = sorted((tmp_path / "shapes" / "images").glob("*.png"))[0]
    first.write_bytes(png_header(20000, 20000))
    return cfg, tmp_path, first


def test_a_bomb_in_the_data_is_skipped_and_counted_once(bad_run):
    cfg, tmp_path, _ = bad_run
    train(cfg, tmp_path / "run")  # 3 steps x 4 samples from 6: the bad one is drawn more than once
    import json

    stages = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]
    for st in ("align", "instruct"):
        assert stages[st]["data"] == {"used": 5, "skipped": 1, "skipped_by_reason": {"image too large": 1}}


def test_a_bomb_in_the_data_under_error_names_the_sample(bad_run):
    cfg, tmp_path, bomb = bad_run
    cfg = parse_config(cfg.to_dict(), ["train.stages.0.on_bad_sample=error"])
    with pytest.raises(SampleError) as err:
        train(cfg, tmp_path / "run2")
    # the bomb is the first image: the first caption row of the file names it
    rows = json.loads((tmp_path / "shapes" / "captions.json").read_text())
    row = next(i for i, r in enumerate(rows) if r["image"].endswith(bomb.name))
    assert str(err.value).startswith(f"{tmp_path / 'shapes' / 'captions.json'}: sample {row} (id {rows[row]['id']})")


def test_evaluation_leaves_out_a_record_whose_image_is_bad(bad_run):
    from mmlm.evaluate import evaluate, questions_from

    cfg, tmp_path, _ = bad_run
    model = build(cfg, texts=TEXTS)
    from mmlm.data.sources import read_source

    records = read_source(cfg.train.stages[1].data[0])
    data = StageDataset(records, model.processor, "skip")
    m = evaluate(model, data, max_new_tokens=1)
    bad = [q for q in questions_from(data.records) if q.record == 0]
    assert bad and m["n_eval"] == len(questions_from(data.records)) - len(bad)
    assert m["skipped"] == {"image too large": 1}


def test_max_grad_norm_null_survives_a_round_trip():
    raw = tiny_raw("/unused")
    raw["train"]["stages"][0]["max_grad_norm"] = None
    cfg = parse_config(raw)
    again = parse_config(yaml.safe_load(cfg.to_yaml()))
    assert again.train.stages[0].max_grad_norm is None and again.train.stages[1].max_grad_norm == 1.0


def test_ask_with_a_bomb_is_one_line_and_streaming_prints_the_answer(bad_run):
    cfg, tmp_path, _ = bad_run
    import torch

    runner = CliRunner()
    torch.manual_seed(0)
    model = build(cfg, texts=TEXTS)
    model.save(tmp_path / "ck")
    bomb = sorted((tmp_path / "shapes" / "images").glob("*.png"))[0]
    r = runner.invoke(app, ["ask", str(tmp_path / "ck"), "--image", str(bomb), "what color is the circle?"])
    assert r.exit_code == 2 and r.output.startswith("error: --image:") and "too large" in r.output
    good = sorted((tmp_path / "shapes" / "images").glob("*.png"))[1]
    args = ["ask", str(tmp_path / "ck"), "--image", str(good), "what color is the circle?", "--max-new-tokens", "6"]
    plain = runner.invoke(app, args).output
    streamed = runner.invoke(app, [*args, "--stream"]).output
    import mmlm

    # the command prints the model's own answer (the API's, not just some text), streamed or not
    expected = mmlm.load(tmp_path / "ck").ask("what color is the circle?", good, max_new_tokens=6)
    assert expected and plain == expected + "\n" and streamed == plain


def test_ask_takes_several_images_and_reports_a_placeholder_mismatch_in_one_line(bad_run):
    import mmlm

    cfg, tmp_path, _ = bad_run
    runner = CliRunner()
    import torch

    torch.manual_seed(0)
    build(cfg, texts=TEXTS).save(tmp_path / "ck")
    imgs = sorted((tmp_path / "shapes" / "images").glob("*.png"))[1:3]
    args = ["ask", str(tmp_path / "ck"), "--image", str(imgs[0]), "--image", str(imgs[1]), "--max-new-tokens", "4"]
    r = runner.invoke(app, [*args, "which one is red?"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == mmlm.load(tmp_path / "ck").ask("which one is red?", imgs, max_new_tokens=4)
    r = runner.invoke(app, [*args, "<image> which one is red?"])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "1 <image> placeholder(s) but 2 image(s)" in r.output
