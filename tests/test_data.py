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
    # the {"path": ...} entry is read now: its file is what is missing
    assert len(ds) == 1 and ds.skipped == {"bad format": 3, "missing image": 1}
    with pytest.raises(SampleError) as err:
        StageDataset(recs, model.processor, "error")
    assert "sample 0" in str(err.value) and "JSON object, not int" in str(err.value)


def _read_rows(tmp_path, rows):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    return read_llava(LlavaOptions(path=str(f), image_root=str(tmp_path)))


def _same(rec):
    """A record as training sees it: its messages and its images' resolved paths, in order."""
    return rec.messages, [resolve_image(rec.image_root, p) for p in rec.images]


def test_image_dicts_and_openai_content_parts_read_as_the_llava_row(tmp_path):
    q, a = "what color is the circle?", "red"
    llava_turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]

    def parts(*first):
        return [
            {"role": "user", "content": [*first, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]},
        ]

    def url(u):
        return {"type": "image_url", "image_url": {"url": u, "detail": "auto"}}

    rows = [
        {"image": "a.png", "conversations": llava_turns},
        {"images": [{"path": "a.png"}], "conversations": llava_turns},
        {"image": {"path": "a.png"}, "conversations": llava_turns},
        {"images": ["a.png"], "messages": parts({"type": "image"})},
        {"images": [{"path": "a.png"}], "messages": parts({"type": "image"})},
        {"messages": parts(url("a.png"))},
        {"messages": parts(url("file://a.png"))},
        {"messages": parts(url(f"file://{tmp_path / 'a.png'}"))},
        {"messages": parts({"type": "image", "image": "a.png"})},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                      {"role": "assistant", "content": a}], "images": ["a.png"]},
    ]  # fmt: skip
    recs = _read_rows(tmp_path, rows)
    want = _same(recs[0])
    assert want == ([{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}],
                    [(tmp_path / "a.png").resolve()])  # fmt: skip
    for i, rec in enumerate(recs):
        assert "error" not in rec.info, (i, rec.info)
        assert _same(rec) == want, i


def test_content_parts_take_the_rows_images_in_order_of_their_placeholders(tmp_path):
    llava = {
        "images": ["a.png", "c.png", "b.png"],
        "conversations": [
            {"from": "human", "value": "<image>\n<image>\ncompare\n<image>"},
            {"from": "gpt", "value": "same"},
        ],
    }
    openai = {
        "images": ["a.png", "b.png"],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "image_url", "image_url": {"url": "c.png"}},
                    {"type": "text", "text": "compare"},
                    {"type": "image"},
                ],
            },
            {"role": "assistant", "content": "same"},
        ],
    }
    a, b = _read_rows(tmp_path, [llava, openai])
    assert _same(a) == _same(b) and a.images == ["a.png", "c.png", "b.png"]


def test_remote_inline_and_unknown_image_shapes_are_refused_up_front_naming_the_row(tmp_path):
    turns = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "red"}]

    def parts(part):
        return {"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "red"}]}

    rows = [
        parts({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
        parts({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}),
        {"images": ["http://example.com/a.png"], "conversations": turns},
        {"images": [{"url": "a.png"}], "conversations": turns},
        {"images": [{"bytes": "iVBORw0KGgo="}], "conversations": turns},
        {"images": [3], "conversations": turns},
        parts({"type": "video", "video": "a.mp4"}),
        parts({"type": "input_audio", "input_audio": {"data": "..."}}),
    ]
    recs = _read_rows(tmp_path, rows)
    errors = [r.info["error"] for r in recs]
    assert all(e.reason == "unsupported format" for e in errors)
    for i, e in enumerate(errors):
        assert f"d.json[{i}]" in str(e), str(e)
    remote = "remote/inline images are not read; download them and give a path"
    assert remote in str(errors[0]) and "https://example.com/a.png" in str(errors[0])
    assert remote in str(errors[1]) and remote in str(errors[2])
    assert "images[0] is {'url': 'a.png'}" in str(errors[3]) and "{'bytes'" in str(errors[4])
    assert "'video'" in str(errors[6]) and "'input_audio'" in str(errors[7])
    model = build(tiny_config(), texts=TEXTS)
    ds = StageDataset(recs, model.processor, "skip")
    assert len(ds) == 0 and ds.skipped == {"unsupported format": len(rows)}
    with pytest.raises(SampleError) as err:
        StageDataset(recs, model.processor, "error")
    assert str(err.value).startswith(f"{tmp_path / 'd.json'}: sample 0 (id 0): turn 0 content[0]") and remote in str(
        err.value
    )


def test_a_malformed_image_entry_under_skip_is_counted_once_and_training_goes_on(tmp_path):
    from mmlm.config import parse_config
    from mmlm.data.sources import read_source
    from mmlm.train.runner import train
    from tests.helpers import tiny_raw

    raw = tiny_raw(str(tmp_path / "shapes"), n=6, steps=3)
    world = raw["train"]["stages"][0]["data"][0]
    read_source(parse_config(raw).train.stages[0].data[0])  # generate the world
    rows = json.loads((tmp_path / "shapes" / "captions.json").read_text())
    q, a = rows[2]["conversations"][0]["value"].removeprefix("<image>\n"), rows[2]["conversations"][1]["value"]
    rows[1] = {**rows[1], "images": [{"path": rows[1].pop("image")}]}
    rows[2] = {
        "id": rows[2]["id"],
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": rows[2]["image"]}},
                                         {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]},
        ],
    }  # fmt: skip
    rows[3] = {**rows[3], "image": [{"url": rows[3]["image"]}]}  # the one bad row
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    stage = raw["train"]["stages"][0]
    stage["data"] = [{"format": "llava", "path": str(tmp_path / "mixed.json"), "image_root": world["path"]}]
    stage["on_bad_sample"] = "skip"
    raw["train"]["stages"] = [stage]
    train(parse_config(raw), tmp_path / "run")  # 3 steps x 4 samples from 5
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["align"]["data"]
    assert data == {"used": 5, "skipped": 1, "skipped_by_reason": {"unsupported format": 1}}
