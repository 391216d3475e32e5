"""MultimodalLM.embed: pooling that does not depend on the padding side, prompts from the config,
Matryoshka truncation, the end-token check, and a learned pooling that saves with the model."""

import pytest
import torch
from PIL import Image

import mmlm
from mmlm.config import parse_config
from mmlm.embed.extract import normalise, render
from mmlm.embed.pooling._base import last_positions
from mmlm.errors import ConfigError, SampleError
from mmlm.model import build
from mmlm.registry import POOLINGS
from tests.helpers import tiny_raw

TEXTS = ["a red circle", "what shape is the red object ?", "circle", "blue square top left", "summary above"]
ITEMS = ["a red circle", "blue square top left and a circle", {"text": "circle", "image": "IMG"}, "IMG"]


def model_with(embedding: dict | None = None, seed: int = 0, **processor):
    raw = tiny_raw()
    if embedding is not None:
        raw["model"]["embedding"] = embedding
    raw["processor"].update(processor)
    torch.manual_seed(seed)
    return build(parse_config(raw), texts=TEXTS)


def items():
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    return [
        {k: (img if v == "IMG" else v) for k, v in it.items()} if isinstance(it, dict) else img if it == "IMG" else it
        for it in ITEMS
    ]


@pytest.mark.parametrize("pooling", ["last", "mean", "latent_attention"])
def test_the_vector_is_the_same_with_left_and_right_padding_and_alone(pooling):
    spec = {"type": pooling, **({"num_latents": 4, "heads": 2} if pooling == "latent_attention" else {})}
    right = model_with({"pooling": spec}, padding_side="right")
    left = model_with({"pooling": spec}, padding_side="left")
    left.load_state_dict(right.state_dict())
    a, b = right.embed(items()), left.embed(items())
    assert torch.allclose(a, b, atol=1e-5)
    alone = torch.cat([right.embed([it]) for it in items()])  # no padding at all
    assert torch.allclose(a, alone, atol=1e-5)
    assert not torch.allclose(a[0], a[1], atol=1e-3)  # different items, different vectors


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_last_token_pooling_runs_the_last_mlp_at_one_position_only_and_gives_the_full_vectors(pooling, monkeypatch):
    """The last block's MLP is per token and last pooling reads one token: it runs there only; mean
    pooling reads every token and gets the MLP everywhere. The vectors are those of the full forward."""
    import contextlib

    import mmlm.model

    model = model_with({"pooling": {"type": pooling}}, padding_side="left")
    mlp = model.llm.base_model.layers[-1].mlp
    seen = []
    mlp.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))  # the input it ran on
    got = model.embed(items())
    assert seen and all((s[1] == 1) == (pooling == "last") for s in seen), seen
    seen.clear()
    monkeypatch.setattr(mmlm.model, "last_mlp_only_at", lambda llm, pos: contextlib.nullcontext())
    full = model.embed(items())
    assert all(s[1] > 1 for s in seen)
    torch.testing.assert_close(got, full, atol=1e-6, rtol=0)
    assert len(mlp._forward_hooks) == 1 and not mlp._forward_pre_hooks  # mmlm's hooks are gone


def test_last_position_is_found_on_either_side():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_positions(mask).tolist() == [2, 4, 4]


def test_latent_attention_ignores_masked_positions():
    pool = POOLINGS.create(
        type(
            "C",
            (),
            {
                "name": "latent_attention",
                "parsed": lambda self, r, w: POOLINGS.parse("latent_attention", {"num_latents": 4, "heads": 2}, w),
                "name_key": "type",
            },
        )(),
        32,
        where="x",
    )
    hidden = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    changed = hidden.clone()
    changed[0, 4:] = torch.randn(2, 32) * 100
    out, out2 = pool(hidden, mask), pool(changed, mask)
    assert torch.allclose(out[0], out2[0], atol=1e-5)
    changed[0, 1] += 1.0  # a real position does count
    assert not torch.allclose(pool(changed, mask)[0], out[0], atol=1e-4)


def test_matryoshka_truncates_then_renormalises():
    model = model_with()
    full = model.embed(items())
    short = model.embed(items(), dim=16)
    assert short.shape == (len(ITEMS), 16)
    assert torch.allclose(short.norm(dim=-1), torch.ones(len(ITEMS)), atol=1e-6)
    # the same direction as the first 16 values of the unnormalised vector
    assert torch.allclose(short, torch.nn.functional.normalize(full[:, :16], dim=-1), atol=1e-5)
    assert not torch.allclose(short, full[:, :16], atol=1e-3)
    with pytest.raises(ValueError, match="dim=999"):
        normalise(full, 999)


def test_prompts_come_from_the_config_and_differ_by_side_and_instruction():
    e5v = {
        "query": {
            "text": "{text}\nSummary above sentence in one word:",
            "image": "<image>\nSummary above image in one word:",
        },
        "candidate": {"text": "passage: {text}"},
    }
    cfg = parse_config({**tiny_raw(), "model": {**tiny_raw()["model"], "embedding": e5v}}).model.embedding
    assert render({"text": "a {weird} cat"}, cfg.query) == "a {weird} cat\nSummary above sentence in one word:"
    assert render({"image": 1}, cfg.query) == "<image>\nSummary above image in one word:"
    assert render({"text": "x"}, cfg.candidate, side="candidate") == "passage: x"
    default = parse_config(tiny_raw()).model.embedding.query
    assert render({"text": "q", "image": 1}, default, instruction="Find the colour") == "Find the colour\n<image>\nq"
    assert render({"text": "q", "instruction": "own"}, default, instruction="given") == "own\nq"
    model = model_with(e5v)
    assert not torch.allclose(model.embed(["a red circle"]), model.embed(["a red circle"], side="candidate"))
    with pytest.raises(ConfigError, match=r"model\.embedding\.query\.text.*would be ignored"):
        model.embed(["circle"], instruction="summary above")  # E5-V's template has no {instruction}
    plain = model_with()
    assert not torch.allclose(plain.embed(["circle"]), plain.embed(["circle"], instruction="summary above"))


def test_a_template_without_the_image_placeholder_is_refused_naming_its_key():
    model = model_with({"query": {"image": "describe it"}})
    with pytest.raises(ConfigError, match=r"model\.embedding\.query\.image"):
        model.embed([Image.new("RGB", (32, 32))])


def test_without_the_chat_template_the_end_token_is_appended_by_mmlm_and_pooled():
    model = model_with({"chat_template": False})
    proc = model.processor
    enc = proc.encode_prompt("a red circle", None, chat_template=False)
    assert enc.input_ids[-1] == proc.tokenizer.eos_token_id
    assert proc.tokenizer("a red circle", add_special_tokens=False)["input_ids"][-1] != proc.tokenizer.eos_token_id
    with_template = proc.encode_prompt("a red circle", None, chat_template=True)
    assert with_template.input_ids[-1] == proc.tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_an_empty_or_malformed_item_is_a_sample_error_with_its_index():
    model = model_with()
    with pytest.raises(SampleError, match="sample 1.*text or an image"):
        model.embed(["fine", {"text": ""}])
    with pytest.raises(SampleError, match="sample 0.*unknown key"):
        model.embed([{"txt": "typo"}])


def test_a_learned_pooling_trains_saves_and_loads_with_the_model(tmp_path):
    model = model_with({"pooling": {"type": "latent_attention", "num_latents": 4, "heads": 2}})
    names = [n for n, _ in model.named_parameters() if n.startswith("pooler.")]
    assert "pooler.latents" in names
    vec = model.pool(model.processor.collate([model.processor.encode_prompt("circle", None, True)]))
    vec.sum().backward()
    assert model.get_parameter("pooler.latents").grad.abs().sum() > 0
    with torch.no_grad():
        model.get_parameter("pooler.latents").add_(0.5)
    before = model.embed(items())
    model.save(tmp_path / "ck")
    assert torch.allclose(mmlm.load(tmp_path / "ck").embed(items()), before, atol=1e-6)
