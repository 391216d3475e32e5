"""WebDataset tar shards (``format: webdataset``, mmlm/data/shards.py): shards written here the way
WebDataset and img2dataset write them give the same batches as the equivalent LLaVA JSON, train
through the trainer, and a bad sample is named by its shard and key."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.shapes import generate
from mmlm.data.sources import read_source
from mmlm.errors import SampleError
from mmlm.model import build
from mmlm.train.batches import StageBatches
from mmlm.train.runner import train
from tests.helpers import tiny_raw

PROMPT = "Describe the image briefly."


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shapes world's VQA rows as LLaVA JSON, plus a caption-only and a text-only sample; and the
    same samples in two shards (a .json conversation, or a .txt caption, beside a .png image)."""
    root = tmp_path_factory.mktemp("wds")
    generate(root / "shapes", 10, seed=5, image_size=32)
    rows = json.loads((root / "shapes" / "vqa.json").read_text())
    caption = {"id": "cap", "image": rows[0]["image"], "caption": "a red circle at the top left."}
    text_only = {
        "id": "chat",
        "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "yes"}],
    }
    json_rows = [*rows[:5], text_only, *rows[5:]]
    json_rows.insert(
        3,
        {
            "id": "cap",
            "image": caption["image"],
            "conversations": [
                {"from": "human", "value": f"<image>\n{PROMPT}"},
                {"from": "gpt", "value": caption["caption"]},
            ],
        },
    )
    (root / "rows.json").write_text(json.dumps(json_rows))
    shards = root / "shards"
    shards.mkdir()
    for k, part in enumerate((json_rows[:6], json_rows[6:])):
        with tarfile.open(shards / f"train-{k:06d}.tar", "w") as tar:
            for row in part:
                key = f"s{k}/{row['id']}"
                if row["id"] == "cap":  # img2dataset's shape: image, caption, metadata json
                    _add(tar, f"{key}.txt", caption["caption"].encode())
                    _add(tar, f"{key}.json", json.dumps({"url": "http://example.com/x.png", "key": "cap"}).encode())
                else:
                    body = {k2: v for k2, v in row.items() if k2 != "image"}
                    _add(tar, f"{key}.json", json.dumps(body).encode())
                if "image" in row:
                    _add(tar, f"{key}.png", (root / "shapes" / row["image"]).read_bytes())
    return root, len(json_rows)


def _raw(source: dict) -> dict:
    raw = tiny_raw("unused", steps=3)
    for st in raw["train"]["stages"]:
        st["data"] = [source]
        st["on_bad_sample"] = "error"
    return raw


def _batches(cfg, model, n_micro: int) -> list[dict]:
    st = cfg.train.stages[1]
    recs = read_source(st.data[0], where="train.stages.1.data.0")
    data = StageDataset(recs, model.processor, "error", name=st.name)
    make = StageBatches(data, 4, 0, st.name, 1, "train.stages.1", "error")
    return [make(m) for m in range(n_micro)], data


def test_shards_give_the_batches_of_the_equivalent_json(world):
    root, n = world
    llava = parse_config(_raw({"format": "llava", "path": str(root / "rows.json"), "image_root": str(root / "shapes")}))
    shards = parse_config(_raw({"format": "webdataset", "path": str(root / "shards")}))
    texts = [t for r in read_source(llava.train.stages[0].data[0]) for t in r.texts()]
    model = build(llava, texts=texts)
    a, data_a = _batches(llava, model, 6)  # 24 draws: every sample, in the stage's seeded order
    b, data_b = _batches(shards, model, 6)
    assert len(data_a) == len(data_b) == n and data_b.report()["skipped"] == 0
    assert any("pixel_values" not in x or x["pixel_values"].shape[0] < 4 for x in a)  # text-only rows mixed in
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k
    # the images stay in the shards until a batch draws them
    rec = data_b.records[0]
    assert rec.images and type(rec.images[0]).__name__ == "TarMember" and rec.images[0].shard.endswith(".tar")


def test_shards_train_and_a_bad_sample_names_its_shard_and_key(world, tmp_path):
    root, n = world
    raw = _raw({"format": "webdataset", "path": str(root / "shards")})
    run = train(parse_config(raw), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stages"]["instruct"]["data"]["used"] == n
    assert run is not None and (tmp_path / "run" / "stages" / "instruct" / "model.safetensors").is_file()

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        _add(
            tar,
            "ok.json",
            json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}).encode(),
        )
        _add(tar, "broken.png", b"\x89PNG\r\n\x1a\n not really")
        _add(
            tar,
            "broken.json",
            json.dumps(
                {"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "no"}]}
            ).encode(),
        )
        _add(tar, "lonely.png", next((root / "shapes" / "images").iterdir()).read_bytes())
    cfg = parse_config(_raw({"format": "webdataset", "path": str(bad)}))
    model = build(cfg, texts=["hi", "yes", "no"])
    recs = read_source(cfg.train.stages[0].data[0])
    assert [r.id for r in recs] == ["ok", "broken", "lonely"]
    with pytest.raises(SampleError) as err:  # nothing to learn from: found when the stage starts
        StageDataset(recs, model.processor, "error", name="align")
    assert "bad.tar: sample 2 (id lonely)" in str(err.value) and "no conversation" in str(err.value)
    data = StageDataset(recs, model.processor, "skip", name="align")
    assert data.report()["skipped_by_reason"] == {"bad format": 1}
    with pytest.raises(SampleError) as err:  # the corrupt image: found when a batch draws it
        data.load(1)
    assert "bad.tar:broken.png" in str(err.value)
