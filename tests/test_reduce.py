"""Token reduction (mmlm/reduce/): ALGORITHMS.md's properties of merging and pruning, on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TEXTS, tiny_raw
from PIL import Image

import mmlm
from mmlm.config import parse_config
from mmlm.errors import ConfigError
from mmlm.processor import IGNORE_INDEX
from mmlm.reduce._base import keep_count
from mmlm.reduce.aim import AIM, AIMOptions
from mmlm.reduce.tome import ToMe, ToMeOptions, bipartite_merge
from mmlm.reduce.visionzip import VisionZip, VisionZipOptions

# ---------------------------------------------------------------------------------------- merging


def test_tome_merges_r_tokens_per_step():
    x = torch.randn(3, 16, 8)
    assert ToMe(ToMeOptions(r=5)).merge(x).shape == (3, 11, 8)
    assert ToMe(ToMeOptions(r=3, steps=2)).merge(x).shape == (3, 10, 8)
    # r is capped at half the tokens of a step: 16 -> 8 -> 4
    assert ToMe(ToMeOptions(r=100, steps=2)).merge(x).shape == (3, 4, 8)
    for keep, n in ((0.5, 8), (0.25, 4), (0.3, 5)):
        red = ToMe(ToMeOptions(keep=keep))
        assert red.num_output_tokens(16) == n == red.merge(x).shape[1]


def test_tome_merges_duplicated_pairs_back_to_the_originals():
    distinct = torch.nn.functional.normalize(torch.randn(2, 6, 16), dim=-1) * 3
    pairs = distinct.repeat_interleave(2, dim=1)  # t0 t0 t1 t1 ...
    out = ToMe(ToMeOptions(r=6)).merge(pairs)
    torch.testing.assert_close(out, distinct)


def test_tome_averages_weighted_by_size_across_steps():
    u = torch.tensor([1.0, 0.0, 0.0])
    v = torch.tensor([0.9, 0.1, 0.0])  # near u: merged with it at step 2
    w = torch.tensor([0.0, 0.0, 1.0])
    x = torch.stack([u, u, v, w]).unsqueeze(0)
    size = torch.ones(1, 4, 1)
    x1, s1 = bipartite_merge(x, size, 1)  # u + u -> u of size 2
    assert s1.flatten().tolist() == [2.0, 1.0, 1.0]
    x2, s2 = bipartite_merge(x1, s1, 1)  # u (size 2) joins v
    merged = x2[0, s2[0, :, 0] == 3][0]
    torch.testing.assert_close(merged, (2 * u + v) / 3)
    assert not torch.allclose(merged, (u + v) / 2)


def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest():
    torch.manual_seed(0)
    x = torch.randn(2, 20, 8)
    red = VisionZip(VisionZipOptions(keep=0.5, context=0.2))
    out = red.merge(x)
    assert out.shape[1] == red.num_output_tokens(20) == 10
    dominant, context = out[:, :8], out[:, 8:]
    for b in range(2):
        # each dominant token is an input token, unchanged; none is picked twice
        hits = [(x[b] == t).all(dim=-1).nonzero().flatten().tolist() for t in dominant[b]]
        assert all(len(h) == 1 for h in hits) and len({h[0] for h in hits}) == 8
        rest = [i for i in range(20) if [i] not in hits]
        # the context tokens are group means of the rest: their size-weighted sum is the rest's sum
        # (each group has at least its target), so they lie in the rest's span, not the dominant's
        assert context.shape[1] == 2
        assert torch.linalg.matrix_rank(torch.cat([x[b, rest], context[b]])) == torch.linalg.matrix_rank(x[b, rest])


def test_keep_one_merges_nothing():
    x = torch.randn(2, 9, 4)
    for red in (ToMe(ToMeOptions(keep=1)), VisionZip(VisionZipOptions(keep=1)), AIM(AIMOptions(keep=1, end_keep=1))):
        assert red.num_output_tokens(9) == 9
        torch.testing.assert_close(red.merge(x), x)


def test_aim_schedule_falls_linearly_over_the_second_half():
    red = AIM(AIMOptions(keep=0.5))
    assert red.keep_schedule(8) == {4: 0.75, 5: 0.5, 6: 0.25, 7: 0.0}
    assert AIM(AIMOptions(keep=0.5, end_keep=0.2)).keep_schedule(4) == pytest.approx({2: 0.6, 3: 0.2})
    assert AIM(AIMOptions(keep=0.5, end_keep=1)).keep_schedule(8) == {}


# ---------------------------------------------------------------------------------------- models


def build(reduction: dict | None = None, layers: int = 4, attn: str | None = None):
    raw = tiny_raw()
    raw["model"]["llm"]["config"]["num_hidden_layers"] = layers
    if attn:
        raw["model"]["llm"]["attn_implementation"] = attn
    if reduction:
        raw["model"]["token_reduction"] = {"image": reduction}
    torch.manual_seed(0)
    model = mmlm.build(parse_config(raw), texts=TEXTS).eval()
    with torch.no_grad():  # a random LLM with large weights: its next token changes from step to step
        for p in model.llm.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def images(n: int) -> list[Image.Image]:
    return [Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")) for i in range(n)]


def batch_of(model, side: str = "left"):
    """Two rows with different image counts (1 and 2): pruning keeps different counts per row."""
    ims = images(3)
    msgs = [
        [{"role": "user", "content": "<image>\nwhat colour is the circle"}],
        [{"role": "user", "content": "<image><image>\nis there a square"}, {"role": "assistant", "content": "yes"}],
    ]
    gen = side == "left"
    return model.processor(msgs, [{"image": ims[:1]}, {"image": ims[1:]}], add_generation_prompt=gen, padding_side=side)


REDUCTIONS = [
    {"type": "tome", "keep": 0.5},
    {"type": "visionzip", "keep": 0.5},
    {"type": "fastv", "keep": 0.5, "layer": 1},
    {"type": "aim", "keep": 0.5},
]


@pytest.mark.parametrize(
    "reduction",
    [
        {"type": "tome", "keep": 1},
        {"type": "visionzip", "keep": 1},
        {"type": "fastv", "keep": 1, "layer": 1},
        {"type": "aim", "keep": 1, "end_keep": 1},
    ],
    ids=lambda r: r["type"],
)
def test_keep_one_gives_the_logits_of_no_reduction(reduction):
    plain, reduced = build(), build(reduction)
    reduced.load_state_dict(plain.state_dict())
    b = batch_of(plain)
    with torch.no_grad():
        a, c = plain(**plain.inputs(b)).logits, reduced(**reduced.inputs(b)).logits
    assert torch.equal(a, c)


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=lambda r: r["type"])
def test_the_processor_expands_placeholders_to_the_reduced_count(reduction):
    plain, reduced = build(), build(reduction)
    n = plain.processor.media["image"].num_tokens
    merges = reduction["type"] in ("tome", "visionzip", "aim")
    assert reduced.processor.media["image"].num_tokens == (n // 2 if merges else n)
    b = batch_of(reduced)
    spec = reduced.processor.media["image"]
    assert (b["input_ids"] == spec.token_id).sum(dim=1).tolist() == [spec.num_tokens, 2 * spec.num_tokens]
    with torch.no_grad():
        out = reduced.generate(b, max_new_tokens=3)  # the merged tokens fill the placeholders exactly
    assert [len(o) for o in out] == [3, 3]


@pytest.mark.parametrize("reduction", REDUCTIONS[2:], ids=lambda r: r["type"])
def test_pruning_never_drops_text_and_keeps_what_the_schedule_says(reduction):
    model = build(reduction)
    b = batch_of(model)
    ids, mask = b["input_ids"], b["attention_mask"]
    media = ids == model.processor.media["image"].token_id
    with torch.no_grad(), model.pruning(ids, mask) as run:
        model.llm(inputs_embeds=model.embed_inputs(ids, b)[0], attention_mask=mask, use_cache=False)
    schedule = model.reducers["image"].keep_schedule(4)
    assert schedule and sorted(run.kept) == sorted(schedule)
    for layer, frac in schedule.items():
        assert run.kept[layer] == [keep_count(int(n), frac) for n in media.sum(dim=1)]
    idx, valid = run.cur
    for row in range(2):
        kept = set(idx[row][valid[row]].tolist())
        text = {i for i in range(ids.shape[1]) if mask[row, i] and not media[row, i]}
        assert text <= kept  # every real text position reached the last layer
        assert len(kept & set(media[row].nonzero().flatten().tolist())) == run.kept[max(schedule)][row]


@pytest.mark.parametrize("reduction", REDUCTIONS[2:], ids=lambda r: r["type"])
def test_gathered_pruning_equals_the_masking_reference(reduction):
    """The reference keeps every position and masks dropped ones (eager attention, AIM's way)."""
    model = build(reduction, attn="eager")
    b = batch_of(model)
    ids, mask = b["input_ids"], b["attention_mask"]
    real_pruning = model.pruning

    def reference(i, m, gather=True):
        return real_pruning(i, m, gather=False)

    kw = dict(max_new_tokens=12, temperature=1.0, seed=[3, 4])
    with torch.no_grad():
        fast = model.generate(b, **kw)
        with model.pruning(ids, mask) as run:
            model.llm(inputs_embeds=model.embed_inputs(ids, b)[0], attention_mask=mask, use_cache=False)
        model.pruning = reference
        slow = model.generate(b, **kw)
        with model.pruning(ids, mask) as ref:
            model.llm(inputs_embeds=model.embed_inputs(ids, b)[0], attention_mask=mask, use_cache=False)
    assert fast == slow
    assert len({tuple(r) for r in fast}) == 2 and len(set(fast[0])) > 3  # tokens that vary: a real check
    assert run.kept == ref.kept
    assert run.cur[0].shape[1] < ids.shape[1] == ref.cur[0].shape[1]  # one gathered, the other masked


def test_training_with_pruning_gives_the_masking_reference_loss():
    model = build({"type": "fastv", "keep": 0.5, "layer": 1}, attn="eager")
    model.train()
    b = batch_of(model, side="right")
    fast = model(**model.inputs(b), labels=b["labels"])
    assert fast.logits.shape[1] < b["input_ids"].shape[1]
    kept = fast.labels_for(b["labels"])
    assert (kept != IGNORE_INDEX).sum() == (b["labels"] != IGNORE_INDEX).sum()  # no answer token lost
    real_pruning = model.pruning
    model.pruning = lambda i, m, gather=True: real_pruning(i, m, gather=False)
    slow = model(**model.inputs(b), labels=b["labels"])
    assert slow.logits.shape[1] == b["input_ids"].shape[1]
    torch.testing.assert_close(fast.loss, slow.loss, atol=1e-5, rtol=1e-5)
    fast.loss.backward()
    assert model.connectors["image"].parameters().__next__().grad is not None


def test_reduction_switches_on_at_load_time(tmp_path):
    plain = build()
    plain.save(tmp_path / "ckpt")
    sets = ("model.token_reduction.image.type=tome", "model.token_reduction.image.keep=0.25")
    reduced = mmlm.load(tmp_path / "ckpt", overrides=sets)
    assert reduced.processor.media["image"].num_tokens == plain.processor.media["image"].num_tokens // 4
    torch.testing.assert_close(
        reduced.connectors["image"].state_dict(), plain.connectors["image"].state_dict(), rtol=0, atol=0
    )


def test_bad_reduction_configs_name_their_key():
    with pytest.raises(ConfigError, match=r"model\.token_reduction\.image\.layer.*4 layers"):
        build({"type": "fastv", "layer": 9})
    with pytest.raises(ConfigError, match="keep.*not both"):
        build({"type": "tome", "keep": 0.5, "r": 2})
    raw = tiny_raw()
    raw["model"]["token_reduction"] = {"audio": {"type": "tome"}}
    with pytest.raises(ConfigError, match="token_reduction.audio: no encoder"):
        parse_config(raw)
    raw["model"]["token_reduction"] = {"image": {"type": "tomee"}}
    with pytest.raises(ConfigError, match="tome"):
        parse_config(raw)


@pytest.mark.parametrize("reduction", REDUCTIONS[2:], ids=lambda r: r["type"])
def test_gathered_pruning_under_sdpa_equals_the_eager_masking_reference(reduction):
    fast, slow = build(reduction, attn="sdpa"), build(reduction, attn="eager")
    assert (fast.llm.config._attn_implementation, slow.llm.config._attn_implementation) == ("sdpa", "eager")
    slow.load_state_dict(fast.state_dict())
    real_pruning = slow.pruning
    slow.pruning = lambda i, m, gather=True: real_pruning(i, m, gather=False)
    b = batch_of(fast)
    kw = dict(max_new_tokens=12, temperature=1.0, seed=[5, 6])
    with torch.no_grad():
        assert fast.generate(b, **kw) == slow.generate(b, **kw)


def test_pruning_survives_activation_checkpointing():
    """Checkpointing runs each layer again in backward: the cut must be the same both times."""
    grads = []
    for checkpointing in (False, True):
        model = build({"type": "aim", "keep": 0.5})
        model.train()
        if checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        b = batch_of(model, side="right")
        out = model(**model.inputs(b), labels=b["labels"])
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.connectors["image"].parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
