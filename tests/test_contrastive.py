"""The contrastive objective and the pairs data it trains on: InfoNCE with LLaVE hardness weighting,
GradCache gradients equal to whole-batch ones, negatives gathered across processes, bad rows named by
their line, and a short training run that lowers the loss on held-out pairs."""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.pairs import PairsOptions, read_pairs
from mmlm.errors import ConfigError, SampleError
from mmlm.model import build
from mmlm.objectives import StepInfo
from mmlm.objectives.contrastive import ContrastiveObjective, ContrastiveOptions, contrastive_loss, hardness_ce
from tests.helpers import tiny_raw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 50, 220),
    "yellow": (230, 220, 40),
    "white": (240, 240, 240),
    "black": (15, 15, 15),
}
STEP = StepInfo("embed", 0, lambda purpose: 0)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ------------------------------------------------------------------------------------ the loss


def test_alpha_zero_is_plain_infonce_exactly():
    q, c = unit(4, 16, seed=1), unit(7, 16, seed=2)  # 4 positives, then 3 hard negatives
    direct = F.cross_entropy(q @ c.T / 0.05, torch.arange(4))
    assert torch.equal(contrastive_loss(q, c, temperature=0.05, alpha=0), direct)
    assert not torch.allclose(contrastive_loss(q, c, temperature=0.05, alpha=9), direct)


def test_symmetric_averages_the_candidate_to_query_loss_over_the_positives():
    q, c = unit(3, 8, seed=3), unit(5, 8, seed=4)
    rows = torch.arange(3)
    q2c = F.cross_entropy(q @ c.T / 0.1, rows)
    c2q = F.cross_entropy(c[:3] @ q.T / 0.1, rows)
    assert torch.allclose(contrastive_loss(q, c, temperature=0.1, alpha=0, symmetric=True), (q2c + c2q) / 2)


def test_hardness_weighting_matches_a_hand_computation_and_its_weight_has_no_gradient():
    cos = [[0.9, 0.2, -0.1], [0.4, 0.7, 0.5]]  # query i's positive is column i
    tau, alpha = 0.1, 9.0
    want, probs = 0.0, []
    for i, row in enumerate(cos):
        logits = [c / tau + (alpha * c if j != i else 0.0) for j, c in enumerate(row)]
        norm = sum(math.exp(v) for v in logits)
        probs.append([math.exp(v) / norm for v in logits])
        want -= math.log(probs[-1][i]) / len(cos)
    x = torch.tensor(cos, dtype=torch.float64, requires_grad=True)
    loss = hardness_ce(x, torch.arange(2), tau, alpha)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    # d loss / d cos_ij = (p_ij - [j == i]) / (B tau): the weight alpha * sg(cos) adds nothing
    # (were it differentiated, a negative's gradient would be p_ij (1 / tau + alpha) / B)
    grad = [[(p - (j == i)) / (len(cos) * tau) for j, p in enumerate(row)] for i, row in enumerate(probs)]
    assert torch.allclose(x.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-10, atol=0)


def _gathered_rank(rank, world, init_file, q, c, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # rank 0 holds queries 0-1, their positives and one hard negative; rank 1 queries 2-3 and two
    mine_q = q[2 * rank : 2 * rank + 2].clone().requires_grad_()
    negs = c[4:5] if rank == 0 else c[5:7]
    mine_c = torch.cat([c[2 * rank : 2 * rank + 2], negs]).clone().requires_grad_()
    loss = contrastive_loss(mine_q, mine_c, temperature=0.05, alpha=9, symmetric=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "q": mine_q.grad, "c": mine_c.grad}, f"{out}.{rank}")
    dist.barrier()  # both ranks are done with every collective
    # Leave without running gloo's C++ destructors: on a loaded machine their teardown now and then
    # aborts the process ("terminate called without an active exception", SIGABRT) after all the
    # work is done, with or without destroy_process_group. What is tested is written above.
    os._exit(0)


def test_negatives_are_gathered_across_processes_with_gradients(tmp_path):
    """Two processes holding half a batch each compute, on average, the loss and gradients of the
    whole batch in one process: every query meets every process's candidates, and gradients flow
    back to the process a candidate came from."""
    import torch.multiprocessing as mp

    q, c = unit(4, 8, seed=5), unit(7, 8, seed=6)
    mp.spawn(_gathered_rank, args=(2, str(tmp_path / "init"), q, c, str(tmp_path / "out")), nprocs=2)
    parts = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    # the whole batch as one process sees it, candidates in the gathered order (rank 0's, then rank 1's)
    wq = q.clone().requires_grad_()
    wc = torch.cat([c[0:2], c[4:5], c[2:4], c[5:7]]).clone().requires_grad_()
    rows = torch.tensor([0, 1, 3, 4])  # where each query's positive sits among the gathered candidates
    from mmlm.objectives.contrastive import hardness_ce as ce

    whole = (ce(wq @ wc.T, rows, 0.05, 9) + ce(wc[rows] @ wq.T, torch.arange(4), 0.05, 9)) / 2
    whole.backward()
    assert torch.allclose((parts[0]["loss"] + parts[1]["loss"]) / 2, whole, atol=1e-6)
    # a process's loss is the mean over its own queries: the average of the two is the whole batch's
    got_q = torch.cat([parts[0]["q"], parts[1]["q"]]) / 2
    got_c = torch.cat([parts[0]["c"], parts[1]["c"]]) / 2
    assert torch.allclose(got_q, wq.grad, atol=1e-6)
    assert torch.allclose(got_c, wc.grad, atol=1e-6)


# ------------------------------------------------------------------------------------ pairs data


def write_pairs(folder, name, rows):
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def colour_images(folder, prefix="", seed=0, per_colour=1):
    """Solid squares in shades of each colour: [(file name, colour name)]."""
    rng = random.Random(seed)
    out = []
    for k in range(per_colour):
        for colour, rgb in COLOURS.items():
            shade = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in rgb)
            f = f"{prefix}{colour}-{k}.png"
            Image.new("RGB", (32, 32), shade).save(folder / f)
            out.append((f, colour))
    return out


def model_for(texts, **llm_config):
    raw = tiny_raw()
    raw["model"]["llm"]["config"].update(llm_config)
    torch.manual_seed(0)
    return build(parse_config(raw), texts=texts)


@pytest.fixture(scope="module")
def model():
    return model_for([f"a {c} square" for c in COLOURS] + ["which colour is it", "a shape"])


def pairs_data(model, path, policy="error"):
    return StageDataset(
        read_pairs(PairsOptions(path=str(path))), model.processor, policy, embedding=model.config.model.embedding
    )


GOOD = {"query": {"text": "which colour is it"}, "positive": {"text": "a red square"}}
BAD = {
    "bad json": '{"query": {"text": "a red square"}, "positive": ',
    "empty side": {"query": {"text": "which colour is it"}, "positive": {"text": ""}},
    "missing image": {"query": {"image": "nowhere.png"}, "positive": {"text": "a blue square"}},
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_a_bad_pairs_row_stops_the_stage_naming_its_file_and_line(tmp_path, model, reason):
    path = write_pairs(tmp_path, "pairs.jsonl", [GOOD, "", GOOD, BAD[reason], GOOD])  # line 4, after a blank line
    with pytest.raises(SampleError) as err:
        pairs_data(model, path, "error")
    assert err.value.reason == reason
    assert str(err.value).startswith(f"{path}:4: ")


def test_bad_pairs_rows_are_counted_once_each_under_skip(tmp_path, model):
    rows = [GOOD, BAD["bad json"], GOOD, BAD["empty side"], BAD["missing image"], GOOD]
    data = pairs_data(model, write_pairs(tmp_path, "pairs.jsonl", rows), "skip")
    assert data.report() == {
        "used": 3,
        "skipped": 3,
        "skipped_by_reason": {"bad json": 1, "empty side": 1, "missing image": 1},
    }


def test_a_pairs_batch_holds_the_queries_then_positives_and_hard_negatives(tmp_path, model):
    (red, _), (green, _) = colour_images(tmp_path)[:2]
    rows = [
        {"query": {"image": red}, "positive": {"text": "a red square"}, "negatives": [{"text": "a blue square"}]},
        {"query": {"image": green}, "positive": {"text": "a green square"}},
        {"query": {"text": "a shape", "image": green}, "positive": {"image": red}, "instruction": "which colour is it"},
    ]
    data = pairs_data(model, write_pairs(tmp_path, "pairs.jsonl", rows))
    batch = data.collate([data.load(i) for i in range(3)])
    assert set(batch) == {"query", "candidate"}
    assert batch["query"]["input_ids"].shape[0] == 3 and batch["query"]["pixel_values"].shape[0] == 3
    assert batch["candidate"]["input_ids"].shape[0] == 4  # 3 positives, then the hard negative
    assert batch["candidate"]["pixel_values"].shape[0] == 1  # the third positive's image

    def words(row):
        return model.processor.decode(row[row != model.processor.pad_token_id].tolist())

    cands = [words(r) for r in batch["candidate"]["input_ids"]]
    assert "red" in cands[0] and "green" in cands[1] and "blue" in cands[3]
    assert "which colour" in words(batch["query"]["input_ids"][2])  # the row's instruction: query side only
    assert not any("which colour" in t for t in cands)


def test_lm_cannot_share_a_stage_with_contrastive_on_pairs_data():
    raw = tiny_raw("/unused")
    stage = raw["train"]["stages"][1]
    stage["data"] = [{"format": "pairs", "path": "/unused.jsonl"}]
    stage["objectives"] = [{"type": "lm"}, {"type": "contrastive"}]
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "train.stages.1.objectives"
    assert "lm trains on conversations" in str(err.value) and "contrastive" in str(err.value)
    stage["objectives"] = [{"type": "contrastive"}]
    parse_config(raw)  # alone it is fine
    raw["train"]["stages"][0]["objectives"] = [{"type": "contrastive"}]  # on the shapes captions
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "train.stages.0.objectives"


# ------------------------------------------------------------------------------------ GradCache


def mixed_batch(model, folder):
    """Queries and candidates of every kind (text, image, both) with hard negatives, so that chunks
    cut through rows with and without images."""
    imgs = colour_images(folder)
    rows = [
        {"query": {"image": imgs[0][0]}, "positive": {"text": "a red square"}, "negatives": [{"image": imgs[2][0]}]},
        {"query": {"text": "which colour is it"}, "positive": {"image": imgs[1][0]}},
        {
            "query": {"text": "a shape", "image": imgs[3][0]},
            "positive": {"text": "a yellow square"},
            "negatives": [{"text": "a white square"}, {"text": "a black square", "image": imgs[5][0]}],
        },
        {"query": {"image": imgs[4][0]}, "positive": {"text": "a white square", "image": imgs[4][0]}},
    ]
    data = pairs_data(model, write_pairs(folder, "pairs.jsonl", rows))
    return data.collate([data.load(i) for i in range(len(rows))])


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradcache_gradients_equal_whole_batch_gradients(tmp_path, model):
    batch = mixed_batch(model, tmp_path)
    opts = {"alpha": 9.0, "symmetric": True}
    model.train()
    model.zero_grad()
    whole = ContrastiveObjective(ContrastiveOptions(**opts), model, "x")
    assert not whole.handles_backward
    loss = whole(None, batch, STEP)["contrastive"]
    (0.5 * loss).backward()
    want = grads(model)
    model.zero_grad()
    cached = ContrastiveObjective(ContrastiveOptions(chunk_size=3, **opts), model, "x")
    assert cached.handles_backward
    got_loss = cached.backward_step(batch, STEP, 0.5, lambda t: t.backward())["contrastive"]
    got = grads(model)
    model.zero_grad()
    assert not got_loss.requires_grad and torch.allclose(got_loss, loss.detach(), atol=1e-6)
    assert want.keys() == got.keys()
    assert any(k.startswith("connectors.") for k in want) and any(k.startswith("llm.") for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_gradcache_replays_dropout_so_its_second_pass_is_its_first(tmp_path):
    """With dropout on and one chunk per side, GradCache draws the whole batch's masks: it equals the
    whole-batch gradient only if each re-forward replays the random state of its first pass."""
    dropped = model_for([f"a {c} square" for c in COLOURS] + ["which colour is it", "a shape"], attention_dropout=0.3)
    batch = mixed_batch(dropped, tmp_path)
    dropped.train()
    objective = ContrastiveObjective(ContrastiveOptions(), dropped, "x")
    torch.manual_seed(1)
    a = objective.embed(batch["query"])
    assert not torch.allclose(a, objective.embed(batch["query"]))  # dropout is on: passes differ
    torch.manual_seed(7)
    objective(None, batch, STEP)["contrastive"].backward()
    want = grads(dropped)
    dropped.zero_grad()
    torch.manual_seed(7)
    cached = ContrastiveObjective(ContrastiveOptions(chunk_size=16), dropped, "x")
    cached.backward_step(batch, STEP, 1.0, lambda t: t.backward())
    got = grads(dropped)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("chunk_size, grad_accum", [(None, 1), (2, 2)])
def test_training_on_pairs_lowers_the_held_out_loss(tmp_path, chunk_size, grad_accum):
    from mmlm.checkpoint import load
    from mmlm.train.runner import train

    train_rows = [
        {"query": {"image": f}, "positive": {"text": f"a {c} square"}}
        for f, c in colour_images(tmp_path, "train-", seed=0, per_colour=4)
    ]
    rows = train_rows[:5] + [BAD["bad json"], BAD["empty side"], BAD["missing image"]] + train_rows[5:]
    path = write_pairs(tmp_path, "train.jsonl", rows)
    held = [
        {"query": {"image": f}, "positive": {"text": f"a {c} square"}}
        for f, c in colour_images(tmp_path, "held-", seed=1)
    ]
    held_path = write_pairs(tmp_path, "held.jsonl", held)
    raw = tiny_raw()
    objective = {"type": "contrastive", **({"chunk_size": chunk_size} if chunk_size else {})}
    raw["train"] = {
        "seed": 0,
        "stages": [
            {
                "name": "embed",
                "data": [{"format": "pairs", "path": str(path)}],
                "objectives": [objective],
                "on_bad_sample": "skip",
                "lr": 1e-3,
                "steps": 20 // grad_accum,
                "batch_size": 4,
                "grad_accum": grad_accum,
            }
        ],
    }
    trained = train(parse_config(raw), tmp_path / "run")

    def held_out_loss(m):
        data = pairs_data(m, held_path)
        batch = data.collate([data.load(i) for i in range(len(data))])
        m.eval()
        with torch.no_grad():
            return float(ContrastiveObjective(ContrastiveOptions(), m, "x")(None, batch, STEP)["contrastive"])

    before, after = held_out_loss(load(tmp_path / "run" / "init")), held_out_loss(trained)
    assert after < 0.5 * before, (before, after)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["embed"]
    assert metrics["data"]["skipped_by_reason"] == {"bad json": 1, "empty side": 1, "missing image": 1}
    assert set(metrics["losses"]) == {"contrastive"}
