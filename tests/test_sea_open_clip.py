"""SEA with labels from a frozen open_clip model scoring each token's image cell against a word list
(the SEA paper's labelling), on a tiny custom CLIP saved to a temporary file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmlm.config import Component, ConfigError, _validate_options
from mmlm.connectors import build
from mmlm.registry import CONNECTORS
from tests.helpers import run_without_open_clip

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
PRE = {"size": [64, 64], "mean": VLM_MEAN, "std": VLM_STD}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("sea_clip")
    (d / f"{NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / f"{NAME}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(NAME)
    torch.save(model.state_dict(), d / "tiny.pt")
    return d / "tiny.pt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def clip_spec(weights):
    return {"model_name": NAME, "weights": str(weights), "model_config": TINY_CLIP}


def make_sea(weights, **opts):
    opts = {"inner": {"type": "mlp"}, "labels": "open_clip", "word_list": WORDS, "open_clip": clip_spec(weights),
            **opts}
    return build(Component(type="sea", **opts), 32, 48, where="model.connectors.image")


def images(B, side, g):
    """[0, 1] RGB images made of g x g blocks of distinct colours (plus noise), and the same images
    normalised the way the VLM encoder normalises them."""
    colours = torch.rand(B, 3, g, g)
    raw = colours.repeat_interleave(side // g, dim=2).repeat_interleave(side // g, dim=3)
    raw = (raw + 0.05 * torch.randn_like(raw)).clamp(0, 1)
    mean, std = torch.tensor(VLM_MEAN).view(1, 3, 1, 1), torch.tensor(VLM_STD).view(1, 3, 1, 1)
    return raw, (raw - mean) / std


def by_hand(weights, raw, g):
    """Cosine similarity [B, g*g, W] of each cell of ``raw`` with each word, cell by cell."""
    model = open_clip.create_model(NAME, pretrained=str(weights)).eval()
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
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(NAME)(WORDS)), dim=-1)
        img = F.normalize(model.encode_image(torch.stack(cells)), dim=-1)
    return (img @ text.T).view(B, g * g, len(WORDS))


class TinyLM(nn.Module):
    def __init__(self, V=300, D=48):
        super().__init__()
        self.emb = nn.Embedding(V, D)

    def get_input_embeddings(self):
        return self.emb


def tokenize(text, add_special_tokens=False):
    return {"input_ids": [ord(c) % 300 for c in text]}


def train_context(pixels, llm):
    return {"meta": {}, "llm": llm, "tokenizer": tokenize, "training": True, "stage": "align",
            "pixels": pixels, "preprocess": PRE}


# ------------------------------------------------------------------------------------- labelling
@pytest.mark.parametrize("side,g", [(64, 2), (32, 4)])  # cells at CLIP's size; cells resized 8 -> 32
def test_top1_labels_are_the_hand_computed_argmax(clip_weights, side, g):
    sea = make_sea(clip_weights, sample=False)
    raw, pixels = images(3, side, g)
    want_sims = by_hand(clip_weights, raw, g)
    got_sims = sea._scorer().similarity(pixels, {**PRE, "size": [side, side]}, g)
    torch.testing.assert_close(got_sims, want_sims, atol=1e-4, rtol=1e-4)
    labels = sea.clip_labels(pixels, {**PRE, "size": [side, side]}, g * g)
    want = [[WORDS[i] for i in row] for row in want_sims.argmax(-1).tolist()]
    assert labels == want
    # the check can tell cells (and images) apart: the labels are not one word everywhere, and the
    # transposed grid would give other labels
    assert len({w for row in labels for w in row}) > 1
    t = want_sims.view(3, g, g, -1).transpose(1, 2).reshape(3, g * g, -1).argmax(-1)
    assert [[WORDS[i] for i in row] for row in t.tolist()] != labels


def test_sampled_labels_come_from_the_top_k_and_are_reproducible(clip_weights):
    raw, pixels = images(2, 32, 4)
    sims = by_hand(clip_weights, raw, 4)
    top2 = sims.topk(2, dim=-1).indices
    draws = []
    for _ in range(2):  # fresh connectors with the same seed draw the same labels
        sea = make_sea(clip_weights, top_k=2, label_temperature=0.01, seed=7)
        draws.append([sea.clip_labels(pixels, PRE, 16) for _ in range(3)])
    assert draws[0] == draws[1]
    for labels in draws[0]:
        for b in range(2):
            for m in range(16):
                assert WORDS.index(labels[b][m]) in top2[b, m].tolist()
    # a huge temperature makes the draw near uniform over the top 2 (and only them): over 3 draws
    # of 32 cells both occur, and no other word does
    sea = make_sea(clip_weights, top_k=2, label_temperature=1e3, seed=7)
    hot = [sea.clip_labels(pixels, PRE, 16) for _ in range(3)]
    rank = [top2[b, m].tolist().index(WORDS.index(labels[b][m])) if WORDS.index(labels[b][m]) in top2[b, m] else -1
            for labels in hot for b in range(2) for m in range(16)]
    assert set(rank) == {0, 1}
    assert hot[0] != hot[1] != hot[2]  # each batch gets its own draw (seed + a counter)


# ------------------------------------------------------------------------------- the connector
def test_inference_output_is_the_plain_connectors(clip_weights):
    sea = make_sea(clip_weights)
    plain = build(Component(type="mlp"), 32, 48)
    plain.load_state_dict(sea.inner.state_dict())
    _, pixels = images(2, 32, 4)
    feats = torch.randn(2, 16, 32)
    ctx = train_context(pixels, TinyLM())
    sea.eval(), plain.eval()
    with torch.no_grad():
        out = sea(feats, context=ctx)
        want = plain(feats)
    assert isinstance(out, torch.Tensor) and torch.equal(out, want)
    assert sea._scorer_box == []  # nothing was scored, so no CLIP was even built
    # a training stage that does not enable SEA: also the plain output, no loss
    other = make_sea(clip_weights, stages=["align"])
    other.load_state_dict(sea.state_dict())
    other.train()
    out = other(feats, context={**ctx, "stage": "sft"})
    assert isinstance(out, torch.Tensor) and torch.equal(out, plain.train()(feats))


def test_training_loss_is_finite_and_reaches_the_inner_connector(clip_weights):
    sea = make_sea(clip_weights, weight=0.5).train()
    llm = TinyLM()
    _, pixels = images(2, 32, 4)
    feats = torch.randn(2, 16, 32)
    tokens, aux = sea(feats, context=train_context(pixels, llm))
    assert tokens.shape == (2, 16, 48) and set(aux) == {"sea"}
    loss = aux["sea"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in sea.inner.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert llm.emb.weight.grad is None  # targets are detached by default
    assert all(p.grad is None for p in sea._scorer().model.parameters())  # the CLIP stays frozen
    # the loss uses the CLIP labels: with one label it would be ln(1) = 0; the batch has several
    labels = sea.clip_labels(pixels, PRE, 16)
    assert len({w for row in labels for w in row}) > 1


def test_clip_scorer_is_not_in_the_state_dict(clip_weights):
    sea = make_sea(clip_weights).train()
    keys_before = set(sea.state_dict())
    _, pixels = images(1, 32, 4)
    sea(torch.randn(1, 16, 32), context=train_context(pixels, TinyLM()))
    scorer = sea._scorer()
    assert scorer.model is not None and scorer.text.shape == (len(WORDS), 16)
    state = sea.state_dict()
    assert set(state) == keys_before == {f"inner.{k}" for k in sea.inner.state_dict()}
    clip_ptrs = {t.data_ptr() for t in list(scorer.model.state_dict().values()) + [scorer.text]}
    assert not clip_ptrs & {t.data_ptr() for t in state.values()}
    assert sum(p.numel() for p in sea.parameters()) == sum(p.numel() for p in sea.inner.parameters())
    assert not any("model" in n or "text" in n for n, _ in sea.named_buffers())
    # loading the state into a fresh connector (never scored) works strictly
    fresh = make_sea(clip_weights)
    fresh.load_state_dict(state)


# ----------------------------------------------------------------------------------------- config
def test_open_clip_labels_need_word_list_and_model(clip_weights):
    comp = Component(type="sea", labels="open_clip", open_clip=clip_spec(clip_weights))
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.word_list") as err:
        _validate_options(CONNECTORS, comp, "model.connectors.image")
    assert err.value.path == "model.connectors.image.word_list"
    comp = Component(type="sea", labels="open_clip", word_list=WORDS)
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.open_clip") as err:
        _validate_options(CONNECTORS, comp, "model.connectors.image")
    assert err.value.path == "model.connectors.image.open_clip"
    comp = Component(type="sea", labels="open_clip", word_list=WORDS, open_clip={"model_name": NAME})
    with pytest.raises(ConfigError, match="weights"):
        _validate_options(CONNECTORS, comp, "model.connectors.image")
    # the data labels need neither; the full option set validates
    _validate_options(CONNECTORS, Component(type="sea"), "model.connectors.image")
    opts = _validate_options(CONNECTORS, Component(type="sea", labels="open_clip", word_list=WORDS,
                                                   open_clip=clip_spec(clip_weights), top_k=2, sample=False),
                             "model.connectors.image")
    assert opts["open_clip"]["model_config"] == TINY_CLIP


def test_tokenizer_larger_than_text_vocab_is_a_clear_error(tmp_path):
    name = "mmlm-test-sea-clip-small-vocab"
    cfg = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], "vocab_size": 64}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.save(open_clip.create_model(name).state_dict(), tmp_path / "w.pt")
    sea = make_sea(None, open_clip={"model_name": name, "weights": str(tmp_path / "w.pt"), "model_config": cfg})
    with pytest.raises(ValueError, match="only 64 tokens"):
        sea._scorer()


def test_sea_imports_without_open_clip():
    code = (
        "from mmlm.connectors import sea\n"
        "from mmlm.config import Component\n"
        "from mmlm.connectors import build\n"
        "c = build(Component(type='sea', labels='open_clip', word_list=['a'], "
        "open_clip={'model_name': 'ViT-B-32', 'weights': 'w.pt'}), 8, 8)\n"
        "try:\n"
        "    c._scorer()\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
    )
    res = run_without_open_clip(code)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "open-clip-torch" in res.stdout


# ------------------------------------------------------------------------------ through the model
def test_model_passes_pixels_and_preprocess_to_the_scorer(clip_weights):
    from PIL import Image

    from mmlm.config import parse_config
    from mmlm.model import build as build_model
    from tests.helpers import TEXTS, tiny_raw

    raw = tiny_raw()
    raw["model"]["connectors"]["image"] = {"type": "sea", "inner": {"type": "mlp"}, "labels": "open_clip",
                                           "word_list": WORDS, "open_clip": clip_spec(clip_weights), "sample": False}
    model = build_model(parse_config(raw), texts=TEXTS)
    sea = model.connectors["image"]
    seen = []
    real = sea.clip_labels
    sea.clip_labels = lambda pixels, preprocess, m: seen.append((pixels, preprocess, m)) or real(pixels, preprocess, m)
    imgs = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)]]
    conv = [{"role": "user", "content": "<image>\nwhat color is the circle?"}, {"role": "assistant", "content": "red"}]
    batch = model.processor.collate([model.processor.encode(conv, {"image": [im]}) for im in imgs])
    model.eval()
    out = model(**batch)
    assert out.aux_losses == {} and seen == []
    model.train()
    out = model(**batch)
    assert set(out.aux_losses) == {"image.sea"} and torch.isfinite(out.aux_losses["image.sea"])
    (pixels, preprocess, m), = seen
    assert torch.equal(pixels, batch["image_values"]) and m == 16
    assert preprocess == model.encoders["image"].preprocess.describe()
