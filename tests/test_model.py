import pytest
import torch
from PIL import Image

from mmlm.checkpoint import load
from mmlm.errors import PlaceholderMismatch
from mmlm.model import build
from tests.helpers import TEXTS, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build(tiny_config(), texts=TEXTS)


def _batch(model, n=2):
    imgs = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)][:n]]
    convs = [
        [{"role": "user", "content": "<image>\nwhat color is the circle?"}, {"role": "assistant", "content": "red"}]
    ] * n
    enc = [model.processor.encode(c, {"image": [im]}) for c, im in zip(convs, imgs, strict=False)]
    return model.processor.collate(enc)


def test_forward_returns_loss_and_placeholders_take_connector_output(model):
    batch = _batch(model)
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    emb, _ = model.embed_inputs(batch["input_ids"], batch)
    feats = model.connectors["image"](model.encoders["image"](batch["pixel_values"]))
    mask = batch["input_ids"] == -200
    assert torch.equal(emb[mask].reshape(feats.shape), feats)
    # text positions hold the LLM's own embeddings
    text = batch["input_ids"].clamp(min=0)
    assert torch.equal(emb[~mask], model.llm.get_input_embeddings()(text)[~mask])


def test_placeholder_feature_count_mismatch_names_both_counts(model):
    batch = _batch(model, 2)
    with pytest.raises(PlaceholderMismatch) as e:
        model(**{**batch, "pixel_values": batch["pixel_values"][:1]})
    n = model.processor.media["image"].num_tokens
    assert f"{n} feature vectors" in str(e.value) and f"{2 * n} placeholder positions" in str(e.value)


def test_save_then_load_gives_identical_logits(model, tmp_path):
    batch = _batch(model)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    model.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").is_file() and (tmp_path / "ck" / "mmlm.yaml").is_file()
    assert not list((tmp_path / "ck").glob("*.bin")) and not list((tmp_path / "ck").glob("*.pt"))
    again = load(tmp_path / "ck")
    with torch.no_grad():
        after = again(**batch).logits
    assert torch.equal(before, after)
    assert again.processor.tokenizer.get_vocab() == model.processor.tokenizer.get_vocab()


def test_generate_greedy_matches_forward_argmax_and_streams(model):
    model.eval()
    msgs = [{"role": "user", "content": "<image>\nwhat color is the circle?"}]
    img = Image.new("RGB", (32, 32), (255, 0, 0))
    batch = model.processor([msgs], [{"image": [img]}], add_generation_prompt=True)
    streamed = []
    out = model.generate(batch, max_new_tokens=4, stream=lambda step, toks: streamed.append(toks[0]))
    # recompute step by step without the cache
    ids = batch["input_ids"]
    mask = batch["attention_mask"]
    expect = []
    stops = model.processor.stop_token_ids()
    for _ in range(4):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits
        nxt = int(logits[0, -1].argmax())
        if nxt in stops:
            break
        expect.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    assert out[0] == expect
    assert [t for t in streamed if t >= 0] == expect


def test_sampling_is_seeded_and_is_not_greedy(model):
    batch = model.processor([[{"role": "user", "content": "hello there"}]], add_generation_prompt=True)
    greedy = model.generate(batch, max_new_tokens=6)
    samples = [model.generate(batch, max_new_tokens=6, temperature=1.5, seed=s) for s in range(4)]
    assert [model.generate(batch, max_new_tokens=6, temperature=1.5, seed=s) for s in range(4)] == samples
    assert any(s != greedy for s in samples)  # the temperature is used
    assert len({tuple(s[0]) for s in samples}) > 1  # and the seed
    assert model.generate(batch, max_new_tokens=6) == greedy  # greedy is deterministic without a seed


def test_generate_refuses_right_padding(model):
    a = model.processor.encode([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    b = model.processor.encode([{"role": "user", "content": "what color is the circle?"}], add_generation_prompt=True)
    batch = model.processor.collate([a, b], padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        model.generate(batch)


def test_flash_attention_without_cuda_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU script covers flash attention")
    from mmlm.llm import resolve_attn_implementation

    with pytest.raises(RuntimeError, match="flash_attention_2.*needs"):
        resolve_attn_implementation("flash_attention_2")
    assert resolve_attn_implementation("auto") == "sdpa"


def test_media_position_embedding_is_added_after_the_connector():
    from mmlm.config import parse_config
    from tests.helpers import tiny_raw

    raw = tiny_raw()
    raw["model"]["media_position"] = {"image": "learned"}
    m = build(parse_config(raw), texts=TEXTS)
    n = m.processor.media["image"].num_tokens
    assert tuple(m.media_pos["image"].shape) == (n, m.llm.config.hidden_size)
    assert "media_pos.image" in m.state_dict()
    batch = _batch(m)
    feats = m.connectors["image"](m.encoders["image"](batch["pixel_values"]))
    mask = batch["input_ids"] == -200
    emb, _ = m.embed_inputs(batch["input_ids"], batch)
    assert torch.equal(emb[mask].reshape(feats.shape), feats)  # zero at init
    with torch.no_grad():
        m.media_pos["image"].copy_(torch.arange(n, dtype=torch.float32)[:, None].expand(n, m.llm.config.hidden_size))
    emb, _ = m.embed_inputs(batch["input_ids"], batch)
    assert torch.allclose(emb[mask].reshape(feats.shape) - feats, m.media_pos["image"].expand_as(feats))


def test_media_position_for_a_missing_encoder_is_a_config_error():
    from mmlm.config import parse_config
    from mmlm.errors import ConfigError
    from tests.helpers import tiny_raw

    raw = tiny_raw()
    raw["model"]["media_position"] = {"audio": "learned"}
    with pytest.raises(ConfigError, match="media_position.audio"):
        parse_config(raw)


def test_ask_takes_paths_pil_images_and_several_in_order(tmp_path):
    torch.manual_seed(0)
    model = build(tiny_config(), texts=TEXTS)
    a, b = Image.new("RGB", (40, 40), (220, 30, 30)), Image.new("RGB", (40, 40), (30, 30, 220))
    a.save(tmp_path / "a.png")
    kw = {"max_new_tokens": 4}
    assert model.ask("what color?", str(tmp_path / "a.png"), **kw) == model.ask("what color?", a, **kw)
    two = model.ask("which is red?", [a, b], **kw)
    assert two == model.ask("<image><image>\nwhich is red?", [a, b], **kw)  # placeholders added in front
    logits = {}
    for name, order in (("ab", [a, b]), ("ba", [b, a])):
        enc = model.processor([[{"role": "user", "content": "<image><image>\nwhich is red?"}]], [{"image": order}])
        with torch.no_grad():
            logits[name] = model(**model.inputs(enc)).logits[0, -1]
    assert not torch.allclose(logits["ab"], logits["ba"])  # the order of the images reaches the model
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        model.ask("<image><image> which?", [a], **kw)


def test_chat_takes_image_paths(tmp_path):
    torch.manual_seed(0)
    model = build(tiny_config(), texts=TEXTS)
    a = Image.new("RGB", (40, 40), (220, 30, 30))
    a.save(tmp_path / "a.png")
    msgs = [{"role": "user", "content": "<image>\nwhat color?"}]
    assert model.chat(msgs, {"image": [tmp_path / "a.png"]}, max_new_tokens=4) == model.chat(
        msgs, {"image": [a]}, max_new_tokens=4
    )
