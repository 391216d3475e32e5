"""The stage data check is done once (mmlm/data/check_cache.py): a second StageDataset over the same
records and processor reads the saved results instead of checking again, with the same lengths and
refusals; another processor, another record or MMLM_CACHE=off checks again."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import LlavaOptions, read_llava
from mmlm.errors import SampleError
from mmlm.model import build
from tests.helpers import TEXTS, tiny_config, tiny_raw


@pytest.fixture
def rows(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "img" / "ok.png")

    def conv(img, q="what color is the circle?"):
        return {
            "image": img,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "red"}],
        }

    text = {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "yes"}]}
    return [conv("ok.png"), conv("missing.png"), text, conv("ok.png", "how many objects are there?")]


def _records(tmp_path, rows):
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    return read_llava(LlavaOptions(path=str(f), image_root=str(tmp_path / "img")))


def _counting(monkeypatch):
    calls = []
    check = StageDataset._check

    def counted(self, rec, i):
        calls.append(i)
        return check(self, rec, i)

    monkeypatch.setattr(StageDataset, "_check", counted)
    return calls


def test_a_second_check_reads_the_saved_results(tmp_path, rows, monkeypatch):
    monkeypatch.setenv("MMLM_CACHE", str(tmp_path / "cache"))
    calls = _counting(monkeypatch)
    model = build(tiny_config(), texts=TEXTS)
    first = StageDataset(_records(tmp_path, rows), model.processor, "skip", cache=True)
    assert len(calls) == 4 and len(list((tmp_path / "cache" / "checks").glob("*.json"))) == 1
    again = StageDataset(_records(tmp_path, rows), model.processor, "skip", cache=True)
    assert len(calls) == 4  # nothing checked again
    assert again.lengths == first.lengths and again.skipped == first.skipped == {"missing image": 1}
    assert [str(p) for ps in again.paths for p in ps] == [str(p) for ps in first.paths for p in ps]
    # the saved refusal stops a run under on_bad_sample: error, naming the sample as the check would
    with pytest.raises(SampleError) as err:
        StageDataset(_records(tmp_path, rows), model.processor, "error", cache=True)
    assert len(calls) == 4 and "d.json: sample 1" in str(err.value) and "missing.png" in str(err.value)
    # the samples load from the recalled paths exactly as from checked ones
    assert again.load(0).input_ids == first.load(0).input_ids


def test_another_processor_or_record_checks_again_and_off_saves_nothing(tmp_path, rows, monkeypatch):
    monkeypatch.setenv("MMLM_CACHE", str(tmp_path / "cache"))
    calls = _counting(monkeypatch)
    model = build(tiny_config(), texts=TEXTS)
    StageDataset(_records(tmp_path, rows), model.processor, "skip", cache=True)
    shorter = build(parse_config(tiny_raw() | {"processor": {"max_length": 20}}), texts=TEXTS)
    short = StageDataset(_records(tmp_path, rows), shorter.processor, "skip", cache=True)
    assert len(calls) == 8 and short.skipped["too long"] >= 1  # the limit is part of the key
    rows[3]["conversations"][0]["value"] = "<image>\nis there a red circle?"
    StageDataset(_records(tmp_path, rows), model.processor, "skip", cache=True)
    assert len(calls) == 12
    monkeypatch.setenv("MMLM_CACHE", "off")
    StageDataset(_records(tmp_path, rows), model.processor, "skip", cache=True)
    StageDataset(_records(tmp_path, rows), model.processor, "skip", cache=True)
    assert len(calls) == 20 and len(list((tmp_path / "cache" / "checks").glob("*.json"))) == 3


def test_checking_in_forked_processes_finds_what_one_process_finds(tmp_path, rows, monkeypatch):
    import mmlm.data.dataset as dataset

    monkeypatch.setenv("MMLM_CACHE", "off")
    monkeypatch.setattr(dataset, "_PARALLEL_MIN", 8)  # a small data set, forked all the same
    forked = []
    split = dataset._check_in_processes

    def spy(ds, records, workers):
        forked.append(workers)
        return split(ds, records, workers)

    monkeypatch.setattr(dataset, "_check_in_processes", spy)
    many = [dict(r) for r in rows * 10]
    model = build(tiny_config(), texts=TEXTS)
    one = StageDataset(_records(tmp_path, many), model.processor, "skip")
    two = StageDataset(_records(tmp_path, many), model.processor, "skip", workers=2)
    assert forked == [2]
    assert two.lengths == one.lengths and two.skipped == one.skipped == {"missing image": 10}
    assert [r.id for r in two.records] == [r.id for r in one.records]
    assert [str(p) for ps in two.paths for p in ps] == [str(p) for ps in one.paths for p in ps]
    with pytest.raises(SampleError) as err:  # the first refused sample still stops an error run, by index
        StageDataset(_records(tmp_path, many), model.processor, "error", workers=2)
    assert "d.json: sample 1" in str(err.value)
