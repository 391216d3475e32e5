"""The image-use check beside every evaluation: each question shown another sample's image, the
answer loss and accuracy compared with its own image."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.records import Record
from mmlm.data.sources import read_source
from mmlm.evaluate import answer_loss, evaluate, image_use, media_key, shuffled_media
from mmlm.model import build
from mmlm.train.runner import train
from tests.helpers import tiny_raw


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    """A random tiny model and held-out shapes questions (one record per question, so the questions
    about one image are neighbours with the same file)."""
    out = tmp_path_factory.mktemp("held")
    raw = tiny_raw(str(out / "train"), n=8, steps=1)
    raw["train"]["eval"] = {
        "data": [
            {"format": "shapes", "path": str(out / "held"), "n": 10, "seed": 77, "image_size": 32, "task": "questions"}
        ],
        "batch_size": 16,
        "max_new_tokens": 3,
    }
    cfg = parse_config(raw)
    recs = read_source(cfg.train.eval.data[0], "train.eval.data.0")
    texts = [t for st in cfg.train.stages for r in read_source(st.data[0], "x") for t in r.texts()]
    texts += [t for r in recs for t in r.texts()]
    torch.manual_seed(0)
    model = build(cfg, texts=texts)
    model.eval()
    return SimpleNamespace(cfg=cfg, model=model, recs=recs, data=StageDataset(recs, model.processor, "error"), raw=raw)


def test_every_question_is_shown_another_samples_image_and_text_only_ones_are_left_out(held):
    data = held.data
    n = len(data.records)
    assert n > 30 and len({media_key(data, i) for i in range(n)}) == 10  # ~5 questions per image
    donors = shuffled_media(data, range(n))
    assert sorted(donors) == list(range(n))
    for i, j in donors.items():
        assert media_key(data, j) != media_key(data, i)  # never its own image, nor a neighbour's same file
        assert len(data.paths[j]) == len(data.paths[i]) == 1
    assert shuffled_media(data, range(n)) == donors  # deterministic
    assert len(set(donors.values())) > 5  # not every question gets the same image
    # a text-only record has nothing to swap; a lone image has no other sample to take one from
    recs = [*held.recs[:3], Record("t", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}])]
    mixed = StageDataset(recs, held.model.processor, "error")
    assert 3 not in shuffled_media(mixed, range(4))
    assert shuffled_media(mixed, [0]) == {}


def _manual_loss(model, data, records, donors=None):
    """Mean next-token loss over the answers, from the full logits."""
    proc = model.processor
    enc = [proc.encode(data.records[i].messages, data.media(i if donors is None else donors[i])) for i in records]
    batch = proc.collate(enc)
    with torch.no_grad():
        logits = model(**model.inputs(batch)).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits.reshape(labels.numel(), -1), labels.reshape(-1), ignore_index=-100))


def test_the_losses_are_the_answer_loss_with_own_and_with_other_images(held):
    model, data = held.model, held.data
    records = list(range(12))
    donors = shuffled_media(data, records)
    total, count = answer_loss(model, data, records, batch_size=5)
    assert count == sum(int((torch.tensor(data.load(i).labels[1:]) != -100).sum()) for i in records)
    assert total / count == pytest.approx(_manual_loss(model, data, records), rel=1e-5)
    total, count = answer_loss(model, data, records, donors, batch_size=5)
    assert total / count == pytest.approx(_manual_loss(model, data, records, donors), rel=1e-5)


def test_a_model_that_ignores_the_image_shows_no_gap_and_one_that_reads_it_does(held):
    model, data = held.model, held.data
    reads = image_use(model, data, batch_size=16, max_new_tokens=3)
    assert reads["n_eval"] == len(data.records)
    assert abs(reads["loss_shuffled"] - reads["loss"]) > 1e-4  # even a random connector: the image moves the loss
    blind = copy.deepcopy(model)
    last = [m for m in blind.connectors["image"].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()  # every image gives the same tokens (the bias)
    use = image_use(blind, data, batch_size=16, max_new_tokens=3)
    plain = evaluate(blind, data, batch_size=16, max_new_tokens=3)
    assert use["loss_shuffled"] == pytest.approx(use["loss"], abs=1e-6)
    assert use["accuracy_shuffled"] == plain["vqa_accuracy"]
    assert use["by_type_shuffled"] == plain["by_type"]


def test_training_curves_and_eval_report_the_image_use_figures(held, tmp_path):
    raw = json.loads(json.dumps(held.raw))
    raw["train"]["stages"] = raw["train"]["stages"][:1]
    raw["train"]["stages"][0].update({"steps": 2, "eval_every": 1})
    cfg = parse_config(raw)
    model = train(cfg, tmp_path / "run")
    curve = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["align"]["curve"]
    assert [p["step"] for p in curve] == [1, 2]
    data = StageDataset(read_source(cfg.train.eval.data[0], "x"), model.processor, "error")
    use = image_use(model, data, batch_size=16, max_new_tokens=3)
    assert curve[-1]["heldout_loss"] == round(use["loss"], 4)
    assert curve[-1]["shuffled_loss"] == round(use["loss_shuffled"], 4)
    assert curve[-1]["shuffled_accuracy"] == use["accuracy_shuffled"]
    assert curve[0]["heldout_loss"] != curve[1]["heldout_loss"]  # each point measures the model of its step
