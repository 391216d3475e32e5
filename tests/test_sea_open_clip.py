"""The SEA objective with labels from a frozen open_clip model scoring each token's image cell against a
word list (the SEA paper's labelling), on a tiny custom CLIP saved to a temporary file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mmlm.config import parse_config
from mmlm.errors import ConfigError
from mmlm.model import build as build_model
from mmlm.objectives import StepInfo, build_objectives
from mmlm.objectives.sea import SEAObjective
from mmlm.registry import OBJECTIVES
from mmlm.train.seeds import derive_seed
from tests.helpers import TEXTS, run_without_open_clip, tiny_raw

open_clip = pytest.importorskip("open_clip")

NAME = "mmlm-test-sea-clip"
# CLIP's BPE tokenizer (what open_clip gives a custom config) emits ids up to 49407, so the tiny
# text tower keeps CLIP's vocabulary size; everything else is as small as open_clip allows
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORDS = ["red", "green", "blue", "circle", "square", "triangle", "sky", "grass"]
VLM_MEAN, VLM_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # the VLM encoder's normalisation, unlike CLIP's
WHERE = "train.stages.0.objectives.1"


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("sea_clip")
    (d / f"{NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / f"{NAME}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(NAME)
    torch.save(model.state_dict(), d / "tiny.pt")
    return d / "tiny.pt"


@pytest.fixture(scope="module")
def model():
    """The tiny VLM (32 px images, 16 tokens of width 64 per image), its encoder normalising with
    per-channel statistics unlike CLIP's."""
    raw = tiny_raw()
    raw["model"]["encoders"]["image"].update(mean=VLM_MEAN, std=VLM_STD)
    torch.manual_seed(0)
    return build_model(parse_config(raw), texts=TEXTS + WORDS)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def clip_spec(weights):
    return {"model_name": NAME, "weights": str(weights), "model_config": TINY_CLIP}


def stage_raw(objectives, stage=0):
    raw = tiny_raw("unused-shapes-dir", steps=1)  # validation does not read the data
    raw["train"]["stages"][stage]["objectives"] = objectives
    return raw


def make_sea(model, weights, **opts):
    """The sea objective as the trainer builds it: parsed from a stage's objectives list."""
    sea = {"type": "sea", "labels": "open_clip", "word_list": WORDS, "open_clip": clip_spec(weights), **opts}
    cfg = parse_config(stage_raw([{"type": "lm"}, sea]))
    obj = build_objectives(cfg.train.stages[0], model, "train.stages.0")[1]
    assert isinstance(obj, SEAObjective) and obj.where == WHERE
    return obj


def step_at(position, stage="align"):
    return StepInfo(stage, position, lambda purpose: derive_seed(0, 0, position, purpose))


def images(B, side, g, seed=2):
    """[0, 1] RGB images made of g x g blocks of distinct colours (plus noise), and the same images
    normalised the way the VLM encoder normalises them."""
    gen = torch.Generator().manual_seed(seed)
    colours = torch.rand(B, 3, g, g, generator=gen)
    raw = colours.repeat_interleave(side // g, dim=2).repeat_interleave(side // g, dim=3)
    raw = (raw + 0.05 * torch.randn(raw.shape, generator=gen)).clamp(0, 1)
    mean, std = torch.tensor(VLM_MEAN).view(1, 3, 1, 1), torch.tensor(VLM_STD).view(1, 3, 1, 1)
    return raw, (raw - mean) / std


def by_hand(weights, raw, g):
    """Cosine similarity [B, g*g, W] of each cell of ``raw`` with each word, cell by cell."""
    clip = open_clip.create_model(NAME, pretrained=str(weights)).eval()
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    B, _, H, W = raw.shape
    h, w = H // g, W // g
    cells = []  # image-major, then row-major over the grid
    for b in range(B):
        for i in range(g):
            for j in range(g):
                cell = raw[b : b + 1, :, i * h : (i + 1) * h, j * w : (j + 1) * w]
                if (h, w) != (32, 32):
                    cell = F.interpolate(cell, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
                cells.append((cell[0] - mean) / std)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(open_clip.get_tokenizer(NAME)(WORDS)), dim=-1)
        img = F.normalize(clip.encode_image(torch.stack(cells)), dim=-1)
    return (img @ text.T).view(B, g * g, len(WORDS))


def drawn(obj, pixels, step, width=64):
    """Call the objective as the trainer does on a micro-batch with ``pixels`` and return the labels
    it drew (the output's media tokens are random: the labels depend only on the pixels and step)."""
    seen = []
    real = obj.clip_labels
    obj.clip_labels = lambda px, m, seed: seen.append(real(px, m, seed)) or seen[-1]
    try:
        tokens = torch.randn(pixels.shape[0], 16, width)
        losses = obj(SimpleNamespace(media_tokens={"image": tokens}), {"pixel_values": pixels}, step)
    finally:
        del obj.clip_labels
    assert set(losses) == {"sea"} and torch.isfinite(losses["sea"])
    (labels,) = seen
    return labels


# ------------------------------------------------------------------------------------- labelling
@pytest.mark.parametrize("side,g", [(64, 2), (32, 4)])  # cells at CLIP's size; cells resized 8 -> 32
def test_top1_labels_are_the_hand_computed_argmax(model, clip_weights, side, g):
    sea = make_sea(model, clip_weights, sample=False)
    raw, pixels = images(3, side, g)
    want_sims = by_hand(clip_weights, raw, g)
    got_sims = sea.scorer().similarity(pixels, sea.preprocess, g)
    torch.testing.assert_close(got_sims, want_sims, atol=1e-4, rtol=1e-4)
    labels = sea.clip_labels(pixels, g * g, seed=0)
    want = [[WORDS[i] for i in row] for row in want_sims.argmax(-1).tolist()]
    assert labels == want
    assert sea.clip_labels(pixels, g * g, seed=123) == want  # sample: false draws nothing
    # the check can tell cells (and images) apart: the labels are not one word everywhere, and the
    # transposed grid would give other labels
    assert len({w for row in labels for w in row}) > 1
    t = want_sims.view(3, g, g, -1).transpose(1, 2).reshape(3, g * g, -1).argmax(-1)
    assert [[WORDS[i] for i in row] for row in t.tolist()] != labels


def test_sampled_labels_come_from_the_top_k_and_are_reproducible(model, clip_weights):
    raw, pixels = images(2, 32, 4)
    top2 = by_hand(clip_weights, raw, 4).topk(2, dim=-1).indices

    def in_top2(labels):
        return all(WORDS.index(labels[b][m]) in top2[b, m].tolist() for b in range(2) for m in range(16))

    # the same position draws the same labels: twice from one objective (no call counter), and from
    # a fresh objective (a resumed run)
    sea = make_sea(model, clip_weights, top_k=2, label_temperature=0.01, seed=7)
    first = drawn(sea, pixels, step_at(0))
    assert drawn(sea, pixels, step_at(0)) == first
    assert drawn(make_sea(model, clip_weights, top_k=2, label_temperature=0.01, seed=7), pixels, step_at(0)) == first
    assert in_top2(first)
    # a huge temperature makes the draw near uniform over the top 2 (and only them): each position
    # draws its own labels, and over 3 positions of 32 cells both ranks occur and no other word does
    hot = make_sea(model, clip_weights, top_k=2, label_temperature=1e3, seed=7)
    draws = [drawn(hot, pixels, step_at(p)) for p in range(3)]
    assert draws[0] != draws[1] and draws[1] != draws[2] and draws[0] != draws[2]
    assert all(in_top2(d) for d in draws)
    ranks = {top2[b, m].tolist().index(WORDS.index(d[b][m])) for d in draws for b in range(2) for m in range(16)}
    assert ranks == {0, 1}
    assert drawn(hot, pixels, step_at(0)) == draws[0]
    # the generator's seed is the step's "sea-labels" seed plus the seed option
    s = derive_seed(0, 0, 5, "sea-labels")
    only_sea_labels = StepInfo("align", 5, lambda purpose: {"sea-labels": s}[purpose])
    at5 = drawn(hot, pixels, only_sea_labels)
    assert at5 == hot.clip_labels(pixels, 16, s + 7)
    hot0 = make_sea(model, clip_weights, top_k=2, label_temperature=1e3, seed=0)
    assert drawn(hot0, pixels, StepInfo("align", 5, lambda purpose: s + 7)) == at5
    assert drawn(hot0, pixels, only_sea_labels) != at5


# ------------------------------------------------------------------------------ through the model
def _batch(model, raw):
    """A processor batch of [0, 1] images ``raw`` (32 px, exact in uint8) with a caption each."""
    ims = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in raw]
    conv = [{"role": "user", "content": "<image>\nwhat color is the circle?"}, {"role": "assistant", "content": "red"}]
    return model.processor.collate([model.processor.encode(conv, {"image": [im]}) for im in ims])


def test_objective_scores_the_batch_pixels_with_the_encoder_preprocess(model, clip_weights):
    sea = make_sea(model, clip_weights, sample=False)
    raw, _ = images(2, 32, 4)
    raw = (raw * 255).round() / 255  # what a PNG keeps
    batch = _batch(model, raw)
    seen = []
    scorer = sea.scorer()
    real = scorer.similarity
    scorer.similarity = lambda px, pre, g: seen.append((px, pre, g)) or real(px, pre, g)
    labels = []
    real_labels = sea.clip_labels
    sea.clip_labels = lambda px, m, seed: labels.append(real_labels(px, m, seed)) or labels[-1]
    model.eval()
    with torch.no_grad():
        out = model(**model.inputs(batch))
    losses = sea(out, batch, step_at(0))
    assert set(losses) == {"sea"} and torch.isfinite(losses["sea"])
    ((pixels, preprocess, g),) = seen
    assert torch.equal(pixels, batch["pixel_values"]) and g == 4
    assert preprocess == model.encoders["image"].preprocess.describe()
    assert preprocess["mean"] == pytest.approx(VLM_MEAN) and preprocess["std"] == pytest.approx(VLM_STD)
    # the labels are CLIP's on the original images: the VLM's normalisation was undone
    want = [[WORDS[i] for i in row] for row in by_hand(clip_weights, raw, 4).argmax(-1).tolist()]
    assert labels == [want]


def test_training_loss_is_finite_and_reaches_the_connector(model, clip_weights):
    sea = make_sea(model, clip_weights)
    raw, _ = images(2, 32, 4)
    batch = _batch(model, raw)
    model.train()
    model.zero_grad(set_to_none=True)
    losses = sea(model(**model.inputs(batch)), batch, step_at(0))
    assert set(losses) == {"sea"}
    loss = losses["sea"]
    assert loss.ndim == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    grads = [p.grad for p in model.connectors["image"].parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert model.llm.get_input_embeddings().weight.grad is None  # targets are detached by default
    assert all(p.grad is None for p in sea.scorer().model.parameters())  # the CLIP stays frozen
    model.zero_grad(set_to_none=True)


def test_clip_scorer_lives_on_the_objective_not_in_the_model(model, clip_weights):
    keys_before = list(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    sea = make_sea(model, clip_weights)
    raw, _ = images(1, 32, 4)
    drawn(sea, _batch(model, raw)["pixel_values"], step_at(0))
    scorer = sea.scorer()
    assert scorer is sea.scorer()  # built once, kept by the objective
    assert scorer.model is not None and scorer.text.shape == (len(WORDS), 16)
    assert not isinstance(sea, nn.Module)
    state = model.state_dict()
    assert list(state) == keys_before
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert not any(m is scorer.model for m in model.modules())
    clip_ptrs = {t.data_ptr() for t in list(scorer.model.state_dict().values()) + [scorer.text]}
    assert not clip_ptrs & {t.data_ptr() for t in state.values()}
    assert not clip_ptrs & {p.data_ptr() for p in model.parameters()}


# ----------------------------------------------------------------------------------------- config
def test_open_clip_labels_need_word_list_and_model(clip_weights):
    at = "train.stages.1.objectives.1"
    lm = {"type": "lm"}
    with pytest.raises(ConfigError, match=rf"{at}\.word_list") as err:
        parse_config(stage_raw([lm, {"type": "sea", "labels": "open_clip", "open_clip": clip_spec(clip_weights)}], 1))
    assert err.value.path == f"{at}.word_list"
    with pytest.raises(ConfigError, match=rf"{at}\.open_clip") as err:
        parse_config(stage_raw([lm, {"type": "sea", "labels": "open_clip", "word_list": WORDS}], 1))
    assert err.value.path == f"{at}.open_clip"
    no_weights = {"type": "sea", "labels": "open_clip", "word_list": WORDS, "open_clip": {"model_name": NAME}}
    with pytest.raises(ConfigError, match=rf"{at}\.open_clip\.weights"):
        parse_config(stage_raw([lm, no_weights], 1))
    # the data labels need neither; the full option set validates and keeps the CLIP config
    parse_config(stage_raw([lm, {"type": "sea"}], 1))
    full = {"type": "sea", "labels": "open_clip", "word_list": WORDS, "open_clip": clip_spec(clip_weights)}
    cfg = parse_config(stage_raw([lm, {**full, "top_k": 2, "sample": False}], 1))
    opts = cfg.train.stages[1].objectives[1].parsed(OBJECTIVES, at)
    assert opts.open_clip.arch_config == TINY_CLIP and opts.top_k == 2 and opts.sample is False


def test_tokenizer_larger_than_text_vocab_is_a_clear_error(model, tmp_path):
    name = "mmlm-test-sea-clip-small-vocab"
    cfg = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "vocab_size": 64}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.save(open_clip.create_model(name).state_dict(), tmp_path / "w.pt")
    sea = make_sea(model, None, open_clip={"model_name": name, "weights": str(tmp_path / "w.pt"), "model_config": cfg})
    with pytest.raises(ValueError, match=rf"{WHERE}\.open_clip: .*only 64 tokens"):
        sea.scorer()


def test_sea_objective_imports_without_open_clip():
    code = (
        "from mmlm.objectives import sea\n"
        "from mmlm.registry import OBJECTIVES\n"
        "where = 'train.stages.0.objectives.1'\n"
        "opts = OBJECTIVES.parse('sea', {'labels': 'open_clip', 'word_list': ['a'], "
        "'open_clip': {'model_name': 'ViT-B-32', 'weights': 'w.pt'}}, where)\n"
        "assert OBJECTIVES.get('sea').target is sea.SEAObjective\n"
        "try:\n"
        "    sea.ClipScorer(opts.open_clip, opts.word_list, where)\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
    )
    res = run_without_open_clip(code)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "open-clip-torch" in res.stdout
    assert "train.stages.0.objectives.1.labels 'open_clip'" in res.stdout
