"""Connector zoo: each ALGORITHMS.md property, the fusion options, config errors, and an end-to-end
build / train step / save / load for every connector on a tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image
from torch import nn

from mmlm.config import Component, parse_config
from mmlm.connectors import _fusion, build_connector
from mmlm.connectors.pixel_shuffle import fold, unfold
from mmlm.errors import ConfigError


def make(type_, in_dim=32, out_dim=48, llm=None, layer_dims=None, **opts):
    return build_connector(
        Component(type=type_, **opts), in_dim, out_dim, llm=llm, where="model.connectors.image", layer_dims=layer_dims
    )


class TinyLM(nn.Module):
    """Just what a connector asks of an LLM: input embeddings and an output head."""

    def __init__(self, V=300, D=48, tied=False):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def get_input_embeddings(self):
        return self.emb

    def get_output_embeddings(self):
        return self.head


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------- MLP
@pytest.mark.parametrize("n", [24, 25, 3])  # a multiple of pool, one frame over, fewer frames than pool
def test_mlp_pool_is_the_mlp_of_window_means_and_a_short_last_window_averages_its_own_frames(n):
    pooled = make("mlp", pool=4).eval()
    plain = make("mlp").eval()
    plain.load_state_dict(pooled.state_dict())  # the same MLP: pooling adds no weights
    x = torch.randn(2, n, 32)
    starts = range(0, n, 4)
    means = torch.stack([x[:, s : s + 4].mean(dim=1) for s in starts], dim=1)  # by hand, window by window
    with torch.no_grad():
        got = pooled(x)
        want = plain(means)
    assert pooled.num_output_tokens(n) == len(starts) == math.ceil(n / 4)
    assert got.shape == (2, math.ceil(n / 4), 48)
    torch.testing.assert_close(got, want)
    if n % 4:  # the last window holds n % 4 frames and is their mean, not diluted by padding
        torch.testing.assert_close(got[:, -1], plain(x[:, n - n % 4 :].mean(dim=1)).detach())
    assert make("mlp", pool=1).num_output_tokens(n) == n


@pytest.mark.parametrize("pool", [0, -2])
def test_an_mlp_pool_below_one_is_refused_naming_its_key_path(pool):
    raw = tiny_config({"type": "mlp"})
    raw["model"]["connectors"]["audio"] = {"type": "mlp", "pool": pool}
    raw["model"]["encoders"]["audio"] = {"type": "whisper", "config": {"d_model": 32, "max_source_positions": 25}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "model.connectors.audio.pool"
    assert "model.connectors.audio.pool" in str(err.value)


# --------------------------------------------------------------------------------------- Q-Former
def test_qformer_length_is_num_queries_whatever_n():
    q = make("qformer", num_queries=6, hidden=32, heads=4, num_layers=2).eval()
    for n in (1, 5, 37):
        assert q.num_output_tokens(n) == 6
        assert q(torch.randn(2, n, 32)).shape == (2, 6, 48)


def test_qformer_permutation_invariant_in_encoder_tokens():
    q = make("qformer", num_queries=4, hidden=32, heads=4, num_layers=3, cross_attention_freq=1).eval()
    x = torch.randn(2, 11, 32)
    perm = torch.randperm(11)
    assert not torch.equal(perm, torch.arange(11))
    with torch.no_grad():
        a, b = q(x), q(x[:, perm])
        other = q(torch.randn(2, 11, 32))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, other, atol=1e-3)  # the output does depend on the features


def test_qformer_cross_attention_layout_and_query_init():
    q = make("qformer", num_queries=32, hidden=64, heads=4, num_layers=4)  # defaults: freq 2
    assert [layer.cross for layer in q.layers] == [True, False, True, False]
    assert q.queries.shape == (1, 32, 64)
    assert 0.015 < float(q.queries.detach().std()) < 0.025
    assert abs(float(q.queries.detach().mean())) < 0.005


# --------------------------------------------------------------------------------------- resampler
def test_resampler_shape():
    r = make("resampler", num_latents=5, depth=2, heads=4)
    for n in (3, 16):
        assert r.num_output_tokens(n) == 5
        assert r(torch.randn(3, n, 32)).shape == (3, 5, 48)
    r2 = make("resampler", num_latents=7, depth=1, hidden=16, heads=2)
    assert r2(torch.randn(1, 9, 32)).shape == (1, 7, 48)
    assert len(r2.layers) == 1


# --------------------------------------------------------------------------------------- pixel shuffle
def test_pixel_shuffle_shapes():
    C = 8
    x = torch.randn(2, 32 * 32, C)
    assert fold(x, 2).shape == (2, 16 * 16, 4 * C)
    ps = make("pixel_shuffle", in_dim=C, out_dim=20)
    assert ps.num_output_tokens(32 * 32) == 16 * 16
    assert ps(x).shape == (2, 16 * 16, 20)
    assert make("pixel_shuffle", in_dim=C, scale=4).num_output_tokens(32 * 32) == 64


def test_pixel_shuffle_fold_is_an_invertible_permutation():
    C = 3
    x = torch.arange(2 * 1024 * C, dtype=torch.float32).reshape(2, 1024, C)
    y = fold(x, 2)
    assert torch.equal(unfold(y, 2), x)
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)  # same entries, moved
    # output token 0 holds the 2x2 block of patches (0,0), (0,1), (1,0), (1,1) of the 32x32 grid
    assert torch.equal(y[0, 0], torch.cat([x[0, 0], x[0, 1], x[0, 32], x[0, 33]]))
    # token 1 is the next block to the right
    assert torch.equal(y[0, 1], torch.cat([x[0, 2], x[0, 3], x[0, 34], x[0, 35]]))


def test_pixel_shuffle_bad_grid_fails_clearly():
    ps = make("pixel_shuffle", in_dim=8)
    with pytest.raises(ValueError, match=r"3x3 patch grid .*not divisible by scale 2"):
        ps.num_output_tokens(9)
    with pytest.raises(ValueError, match=r"10 tokens, which is not a square"):
        ps.num_output_tokens(10)
    with pytest.raises(ValueError, match="3x3"):
        ps(torch.randn(1, 9, 8))


# --------------------------------------------------------------------------------------- AlignVLM
def test_alignvlm_probabilities_are_distributions():
    lm = TinyLM()
    a = make("alignvlm", llm=lm)
    P = a.probabilities(torch.randn(2, 7, 32))
    assert P.shape == (2, 7, 300)
    assert bool((P >= 0).all())
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 7), atol=1e-5, rtol=0)


def test_alignvlm_output_is_convex_mix_of_llm_embeddings():
    lm = TinyLM()
    a = make("alignvlm", llm=lm)
    with torch.no_grad():
        a.ln2.weight.mul_(8.0)  # sharper P: outputs near the hull's edges, not just its centre
        out = a(torch.randn(4, 9, 32) * 3)
    E = lm.emb.weight.detach()
    lo, hi = E.min(0).values, E.max(0).values
    tol = 1e-5
    assert bool((out >= lo - tol).all()) and bool((out <= hi + tol).all())


def test_alignvlm_one_hot_returns_that_row_exactly():
    lm = TinyLM()
    a = make("alignvlm", llm=lm)
    E = lm.emb.weight.detach()
    idx = torch.tensor([[0, 17, 299]])
    P = torch.nn.functional.one_hot(idx, 300).float()
    with torch.no_grad():
        assert torch.equal(a.embed_probs(P), E[idx])
        # through forward: make LN2's output a fixed huge logit at row 123, so softmax is exactly one-hot
        a.ln2.weight.zero_()
        a.ln2.bias.fill_(-1e4)
        a.ln2.bias[123] = 1e4
        out = a(torch.randn(2, 3, 32))
    assert torch.equal(out, E[123].expand(2, 3, -1))


def test_alignvlm_embeddings_by_reference_not_in_state_dict():
    lm = TinyLM()
    a = make("alignvlm", llm=lm)
    E = lm.emb.weight
    sd = a.state_dict()
    assert set(sd) == {"w1.weight", "w1.bias", "ln1.weight", "ln1.bias", "w2.weight", "ln2.weight", "ln2.bias"}
    assert all(t.data_ptr() != E.data_ptr() for t in sd.values())
    assert all(p is not E for p in a.parameters())
    # W2 starts as a copy of the output head, trained on its own
    assert torch.equal(a.w2.weight, lm.head.weight)
    assert a.w2.weight.data_ptr() != lm.head.weight.data_ptr()
    # a deep copy does not copy the LLM
    assert copy.deepcopy(a)._llm.obj is lm
    # E is read at forward time: changing the LLM's embeddings changes the output
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        before = a(x)
        lm.emb.weight.add_(1.0)
        after = a(x)
    torch.testing.assert_close(after, before + 1.0, atol=1e-5, rtol=0)
    # the LLM is bound at build time only: the same weights bound to another LLM mix that LLM's
    # embeddings, and forward takes the features and nothing else
    other = TinyLM()
    b = make("alignvlm", llm=other)
    b.load_state_dict(a.state_dict())
    assert b._llm.obj is other and a._llm.obj is lm
    with torch.no_grad():
        mixed = b(x)
        torch.testing.assert_close(b.embed_probs(b.probabilities(x)), mixed, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed, a.probabilities(x).detach() @ other.emb.weight.detach(), atol=1e-5, rtol=0)
    assert not torch.allclose(mixed, after, atol=1e-3)
    with pytest.raises(TypeError):
        a(x, context={"llm": other})


def test_alignvlm_chunks_bound_the_vocab_matrix_and_match_unchunked():
    lm = TinyLM()
    a = make("alignvlm", llm=lm, chunk_tokens=4)
    full = make("alignvlm", llm=lm, chunk_tokens=10_000)
    full.load_state_dict(a.state_dict())
    seen = []
    orig = a._probs

    def spy(f1):
        p = orig(f1)
        seen.append(tuple(p.shape))
        return p

    a._probs = spy
    x = torch.randn(2, 9, 32)
    out = a(x)
    out.square().sum().backward()
    ref = full(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.w1.weight.grad, full.w1.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.w2.weight.grad, full.w2.weight.grad, atol=1e-5, rtol=1e-4)
    assert seen and max(s[0] for s in seen) <= 4  # never more than 4 rows of [tokens, V]
    assert sum(s[0] for s in seen) >= 18  # every token went through (recomputed in backward)


def test_alignvlm_needs_the_llm():
    with pytest.raises(ValueError, match="needs the LLM"):
        make("alignvlm")


# --------------------------------------------------------------------------------------- Ovis
def test_ovis_probabilities_and_layout():
    o = make("ovis", vocab_size=64)
    x = torch.randn(2, 5, 32)
    P = o.probabilities(x)
    assert P.shape == (2, 5, 64) and P.dtype == torch.float32
    torch.testing.assert_close(P.sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    assert bool((P >= 0).all())
    assert bool((P[..., -2:] == 0).all())  # indicator entries are not visual words
    assert o.num_output_tokens(5) == 7
    out = o(x)
    assert out.shape == (2, 7, 48)
    W = o.vte.weight
    for b in range(2):
        assert torch.equal(out[b, 0], W[62])  # image-begin indicator: its table row, exactly
        assert torch.equal(out[b, -1], W[63])  # image-end indicator
    torch.testing.assert_close(out[:, 1:-1], P @ W, atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 1], W[62], atol=1e-3)


def test_ovis_init_from_llm_statistics():
    lm = TinyLM(V=500, D=48)
    with torch.no_grad():
        lm.emb.weight.normal_(0.7, 0.05)
    o = make("ovis", vocab_size=256, init_from_llm=True, llm=lm)
    w = o.vte.weight.detach()
    assert abs(float(w.mean()) - 0.7) < 0.01
    assert abs(float(w.std()) - 0.05) < 0.005
    plain = make("ovis", vocab_size=256)
    assert abs(float(plain.vte.weight.detach().mean()) - 0.7) > 0.3
    with pytest.raises(ValueError, match="init_from_llm needs the LLM"):
        make("ovis", vocab_size=16, init_from_llm=True)


# --------------------------------------------------------------------------------------- fusion
def test_gated_xattn_fusion_is_identity_at_init():
    c = make("mlp", in_dim=32, layer_dims=[32, 16, 24], fusion="gated_xattn")
    fusion = c.fusion
    deep = torch.randn(2, 9, 32)
    layers = [deep, torch.randn(2, 9, 16), torch.randn(2, 4, 24)]  # other layers may differ in N and width
    assert torch.equal(fusion(layers), deep)
    assert c.inner.in_dim == 32
    torch.testing.assert_close(c(layers), c.inner(deep), atol=0, rtol=0)
    with torch.no_grad():
        fusion.gate.fill_(0.5)
    assert not torch.allclose(fusion(layers), deep, atol=1e-4)  # the assertion above can fail


def test_concat_fusion_width_and_values():
    c = make("mlp", in_dim=32, layer_dims=[32, 16, 24], fusion="concat")
    assert c.fusion.out_dim == 72 and c.inner.in_dim == 72 and c.in_dim == 72
    layers = [torch.randn(2, 9, 32), torch.randn(2, 9, 16), torch.randn(2, 9, 24)]
    assert torch.equal(c.fusion(layers), torch.cat(layers, -1))
    assert c(layers).shape == (2, 9, 48)
    assert c.num_output_tokens(9) == 9
    with pytest.raises(ValueError, match=r"same number of tokens.*\[9, 9, 4\]"):
        c.fusion([layers[0], layers[1], torch.randn(2, 4, 24)])


def test_scalar_mix_fusion():
    c = make("qformer", in_dim=16, layer_dims=[16, 16, 16], fusion="scalar_mix", num_queries=3, heads=4)
    f = c.fusion
    layers = [torch.randn(2, 5, 16) for _ in range(3)]
    torch.testing.assert_close(f(layers), sum(layers) / 3, atol=1e-6, rtol=0)  # softmax(0) = uniform, gamma = 1
    with torch.no_grad():
        f.weights.copy_(torch.tensor([0.0, math.log(3.0), -1e4]))
        f.gamma.fill_(2.0)
    torch.testing.assert_close(f(layers), 2.0 * (0.25 * layers[0] + 0.75 * layers[1]), atol=1e-6, rtol=0)
    assert c(layers).shape == (2, 3, 48) and c.num_output_tokens(5) == 3
    with pytest.raises(ValueError, match=r"scalar_mix needs layers of equal width.*\[16, 8\]"):
        make("mlp", in_dim=16, layer_dims=[16, 8], fusion="scalar_mix")


def test_several_layers_without_fusion_fail_with_key_and_choices():
    with pytest.raises(ConfigError) as err:
        make("mlp", layer_dims=[32, 32])
    msg = str(err.value)
    assert "model.connectors.image.fusion" in msg
    for choice in _fusion.FUSIONS:
        assert choice in msg
    # one layer: no fusion needed, the plain connector comes back
    assert type(make("mlp", layer_dims=[32])).__name__ == "MLPConnector"
    assert type(make("mlp")).__name__ == "MLPConnector"


@pytest.mark.parametrize("layer_dims", [None, [32]])
def test_fusion_with_a_single_layer_encoder_is_refused(layer_dims):
    with pytest.raises(ConfigError, match="encoder gives one") as err:
        make("mlp", layer_dims=layer_dims, fusion="concat")
    assert err.value.path == "model.connectors.image.fusion"
    assert "select_layers" in str(err.value)


def test_declared_dimensions_must_match_with_key_path():
    def declared(**dims):
        return build_connector(Component(type="mlp", **dims), 32, 48, where="model.connectors.image")

    assert declared(in_dim=32, out_dim=48).in_dim == 32  # matching declarations are fine
    with pytest.raises(ConfigError, match=r"16 but the encoder produces 32: dimension mismatch") as err:
        declared(in_dim=16)
    assert err.value.path == "model.connectors.image.in_dim"
    with pytest.raises(ConfigError, match=r"64 but the LLM's hidden size is 48: dimension mismatch") as err:
        declared(out_dim=64)
    assert err.value.path == "model.connectors.image.out_dim"


# --------------------------------------------------------------------------------------- config errors
def tiny_config(connector: dict, select_layers=None, patch=16, depth=2) -> dict:
    enc = {
        "type": "timm",
        "model_name": "vit_tiny_patch16_224",
        "img_size": 64,
        "kwargs": {"patch_size": patch, "embed_dim": 32, "depth": depth, "num_heads": 2},
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    if select_layers:
        enc["select_layers"] = select_layers
    return {
        "name": "tiny-connector-test",
        "model": {
            "encoders": {"image": enc},
            "connectors": {"image": connector},
            "llm": {
                "type": "scratch",
                "config": {
                    "model_type": "llama",
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 4,
                    "max_position_embeddings": 128,
                },
                "tokenizer": {"type": "word", "vocab_size": 64},
            },
        },
        "processor": {"max_length": 96},
    }


def test_unknown_connector_name_lists_valid_choices():
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_config({"type": "q-former"}))
    msg = str(err.value)
    assert err.value.path == "model.connectors.image.type"
    assert "model.connectors.image.type" in msg and "'q-former'" in msg
    for name in ("qformer", "resampler", "pixel_shuffle", "alignvlm", "ovis", "mlp"):
        assert name in msg


def test_bad_connector_options_name_the_key_path():
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_config({"type": "qformer", "num_querys": 4}))
    msg = str(err.value)
    assert "model.connectors.image.num_querys" in msg and "unknown key" in msg and "num_queries" in msg
    with pytest.raises(ConfigError) as err:
        parse_config(tiny_config({"type": "mlp", "fusion": "sum"}))
    msg = str(err.value)
    assert "model.connectors.image.fusion" in msg
    assert all(c in msg for c in ("'concat'", "'scalar_mix'", "'gated_xattn'"))
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.scale"):
        parse_config(tiny_config({"type": "pixel_shuffle", "scale": 0}))
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.vocab_size"):
        parse_config(tiny_config({"type": "ovis", "vocab_size": "many"}))
    # a good one parses
    assert parse_config(tiny_config({"type": "ovis", "vocab_size": 32})).model.connectors["image"].type == "ovis"


# --------------------------------------------------------------------------------------- end to end
TEXTS = [
    "what color is the big red circle ?",
    "the answer is red",
    "a small blue square and a green triangle",
    "describe the image",
    "yes",
    "no",
]

E2E = {
    "qformer": ({"type": "qformer", "num_queries": 4, "hidden": 32, "heads": 4, "cross_attention_freq": 1}, None, 4),
    "resampler": ({"type": "resampler", "num_latents": 3, "heads": 4}, None, 3),
    "pixel_shuffle": ({"type": "pixel_shuffle", "scale": 2}, None, 4),
    "alignvlm": ({"type": "alignvlm", "chunk_tokens": 8}, None, 16),
    "ovis": ({"type": "ovis", "vocab_size": 40, "init_from_llm": True}, None, 18),
    "concat+pixel_shuffle": ({"type": "pixel_shuffle", "fusion": "concat"}, [-1, -2], 4),
    "scalar_mix+mlp": ({"type": "mlp", "fusion": "scalar_mix"}, [-1, -2], 16),
    "gated_xattn+qformer": ({"type": "qformer", "fusion": "gated_xattn", "num_queries": 2, "heads": 4}, [-1, -2], 2),
}


def _images(n):
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(n)]


@pytest.mark.parametrize("case", list(E2E))
def test_connector_end_to_end_train_save_load(case, tmp_path):
    from mmlm.checkpoint import load
    from mmlm.model import build as build_model

    conn, layers, n_tokens = E2E[case]
    cfg = parse_config(tiny_config(conn, select_layers=layers))
    model = build_model(cfg, texts=TEXTS)
    assert model.processor.media["image"].num_tokens == n_tokens
    convs = [
        [
            {"role": "user", "content": "<image>\nwhat color is the big red circle ?"},
            {"role": "assistant", "content": "red"},
        ],
        [
            {"role": "user", "content": "<image>\ndescribe the image"},
            {"role": "assistant", "content": "a small blue square"},
        ],
    ]
    batch = model.processor(convs, [{"image": [im]} for im in _images(2)], add_generation_prompt=False)
    assert int((batch["input_ids"] == -200).sum()) == 2 * n_tokens
    untrained = model.ask("what color is the big red circle ?", image=_images(2)[0], max_new_tokens=3)
    model.train()
    conn_params = dict(model.connectors["image"].named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs = model.inputs(batch)
    assert set(inputs) == {"input_ids", "attention_mask", "position_ids", "pixel_values"}
    out = model(**inputs, labels=batch["labels"])
    assert torch.isfinite(out.loss)
    assert tuple(out.media_tokens["image"].shape) == (2, n_tokens, 64)  # the connector output, per image
    out.loss.backward()
    grads = {n: p.grad for n, p in conn_params.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    assert grads, f"{case}: no gradient reached the connector"
    opt.step()
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    model.save(tmp_path / "ck")
    again = load(tmp_path / "ck")
    with torch.no_grad():
        after = again(**again.inputs(batch)).logits
    assert torch.equal(before, after)
    # the generation path too: the step taught the first conversation's answer, and ask's cached
    # decoding says what step-by-step argmax of the full forward says
    img = _images(2)[0]
    answer = again.ask("what color is the big red circle ?", image=img, max_new_tokens=3)
    assert answer == "red" != untrained, (untrained, answer)
    msgs = [convs[0][:1]]
    gen = again.processor(msgs, [{"image": [img]}], add_generation_prompt=True)
    ids, expect = gen["input_ids"], []
    for _ in range(3):
        with torch.no_grad():
            nxt = int(again(input_ids=ids, pixel_values=gen["pixel_values"]).logits[0, -1].argmax())
        if nxt in again.processor.stop_token_ids():
            break
        expect.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert expect and answer == again.processor.decode(expect), (answer, expect)
    if case == "alignvlm":  # the LLM embedding matrix is stored once, under llm.*, never under the connector
        from safetensors.torch import load_file

        keys = [k for k in load_file(str(tmp_path / "ck" / "model.safetensors")) if k.startswith("connectors.image.")]
        assert sorted(k.split(".", 2)[2] for k in keys) == sorted(
            ["w1.weight", "w1.bias", "ln1.weight", "ln1.bias", "w2.weight", "ln2.weight", "ln2.bias"]
        )


def test_pixel_shuffle_rejects_odd_grid_when_the_model_is_built():
    from mmlm.model import build as build_model

    cfg = parse_config(tiny_config({"type": "pixel_shuffle"}, patch=32, depth=1))  # 64 px / 32 = a 2x2 grid: fine
    assert build_model(cfg, texts=TEXTS).processor.media["image"].num_tokens == 1
    cfg = parse_config(tiny_config({"type": "pixel_shuffle", "scale": 4}, patch=32, depth=1))
    with pytest.raises(ValueError, match=r"2x2 patch grid .*not divisible by scale 4"):
        build_model(cfg, texts=TEXTS)


def test_multi_layer_encoder_without_fusion_fails_at_build():
    from mmlm.model import build as build_model

    cfg = parse_config(tiny_config({"type": "mlp"}, select_layers=[-1, -2]))
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.fusion.*concat, scalar_mix, gated_xattn"):
        build_model(cfg, texts=TEXTS)
