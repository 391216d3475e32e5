import json

import pytest

from mmlm.data.dataset import StageDataset
from mmlm.data.records import resolve_image
from mmlm.data.shapes import QUESTION_TYPES, generate
from mmlm.data.sources import LlavaOptions, read_llava
from mmlm.errors import SampleError
from mmlm.model import build
from tests.helpers import TEXTS, tiny_config


def test_shapes_world_is_deterministic_and_seeds_differ(tmp_path):
    a = generate(tmp_path / "a", 12, seed=5, image_size=48)
    b = generate(tmp_path / "b", 12, seed=5, image_size=48)
    generate(tmp_path / "c", 12, seed=6, image_size=48)
    qa = (tmp_path / "a" / "questions.jsonl").read_text()
    assert qa == (tmp_path / "b" / "questions.jsonl").read_text()
    assert (tmp_path / "a/images/5_000003.png").read_bytes() == (tmp_path / "b/images/5_000003.png").read_bytes()
    assert json.loads((tmp_path / "a/scenes.json").read_text()) != json.loads((tmp_path / "c/scenes.json").read_text())
    assert a["n_questions"] == b["n_questions"]


def test_shapes_world_answers_match_scenes(tmp_path):
    generate(tmp_path, 60, seed=2, image_size=48)
    scenes = {s["image"]: s for s in json.loads((tmp_path / "scenes.json").read_text())}
    qs = [json.loads(line) for line in (tmp_path / "questions.jsonl").read_text().splitlines()]
    assert {q["type"] for q in qs} == set(QUESTION_TYPES)
    yes = sum(q["answer"] == "yes" for q in qs if q["type"] == "exists")
    no = sum(q["answer"] == "no" for q in qs if q["type"] == "exists")
    assert yes == no  # existence questions are balanced
    for q in qs:
        objs = scenes[q["image"]]["objects"]
        if q["type"] == "count":
            assert q["answer"] == ["one", "two", "three"][len(objs) - 1]
        if q["type"] == "exists":
            words = q["question"].removeprefix("is there a ").rstrip("?").split()
            present = any(o["color"] == words[0] and o["shape"] == words[1] for o in objs)
            assert (q["answer"] == "yes") == present
        if q["type"] == "shape":
            color = q["question"].split()[4]
            match = [o for o in objs if o["color"] == color]
            assert len(match) == 1 and match[0]["shape"] == q["answer"]
        if q["type"] == "position":
            _, _, _, color, shape = q["question"].rstrip("?").split()
            match = [o for o in objs if o["color"] == color and o["shape"] == shape]
            assert len(match) == 1 and match[0]["position"] == q["answer"]
    s = next(iter(scenes.values()))
    assert len(s["patch_objects"]["3"]) == 9 and len(s["patch_objects"]["6"]) == 36
    # at the 3x3 grid every object owns its cell's patch
    for s in scenes.values():
        from mmlm.data.shapes import label_words

        words = label_words(s["objects"], s["patch_objects"]["3"])
        for o in s["objects"]:
            assert words[o["cell"]] == f"{o['color']} {o['shape']}"
        assert sum(w != "background" for w in words) == len(s["objects"])


def test_image_path_escaping_root_is_refused(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    with pytest.raises(SampleError, match="escapes the image root"):
        resolve_image(root, "../secret.png")
    with pytest.raises(SampleError, match="escapes the image root"):
        resolve_image(root, "/etc/passwd")
    assert resolve_image(root, "a/b.png") == (root / "a/b.png").resolve()


def _llava(tmp_path, rows):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    return read_llava(LlavaOptions(path=str(f), image_root=str(tmp_path / "img")))


def test_bad_samples_error_names_index_or_are_skipped_and_counted(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img" / "ok.png")
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    (tmp_path / "outside.png").write_bytes(b"x")

    def conv(img):
        return {
            "image": img,
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the circle?"},
                {"from": "gpt", "value": "red"},
            ],
        }

    long = {
        "image": "ok.png",
        "conversations": [{"from": "human", "value": "<image>\n" + "red " * 200}, {"from": "gpt", "value": "red"}],
    }
    recs = _llava(tmp_path, [conv("ok.png"), conv("missing.png"), conv("../outside.png"), long, conv("ok.png")])
    model = build(tiny_config(), texts=TEXTS)
    with pytest.raises(SampleError) as e:
        StageDataset(recs, model.processor, "error")
    assert "sample 1" in str(e.value) and "not found" in str(e.value)
    ds = StageDataset(recs, model.processor, "skip")
    assert len(ds) == 2
    assert ds.skipped == {"missing image": 1, "image path escapes root": 1, "too long": 1}
    # a corrupt image is found when loading, with the reason
    recs2 = _llava(tmp_path, [conv("corrupt.png")])
    ds2 = StageDataset(recs2, model.processor, "skip")
    with pytest.raises(SampleError, match="cannot be decoded") as e:
        ds2.load(0)
    assert e.value.reason == "corrupt image"


def test_rows_that_are_not_conversations_are_bad_samples_not_crashes(tmp_path):
    rows = [
        1,
        {"conversations": []},
        {"conversations": [["human", "hi"]]},
        {"images": [{"path": "a.png"}], "conversations": [{"from": "human", "value": "<image>hi"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    recs = read_llava(LlavaOptions(path=str(tmp_path / "d.json")))
    model = build(tiny_config(), texts=TEXTS)
    ds = StageDataset(recs, model.processor, "skip")
    assert len(ds) == 1 and ds.skipped == {"bad format": 4}
    with pytest.raises(SampleError) as err:
        StageDataset(recs, model.processor, "error")
    assert "sample 0" in str(err.value) and "JSON object, not int" in str(err.value)
