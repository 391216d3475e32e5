"""A genuine pretrained LLM: SmolLM2-135M-Instruct from its GGUF file as the LLM of a VLM."""

import pytest
import torch

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import LlavaOptions, read_llava
from mmlm.model import build
from mmlm.train.runner import train


def one_object_world(out, n: int, seed: int) -> str:
    """A LLaVA JSON of ``n`` 32 px images, each one big shape of a shapes-world colour on white, asked
    its colour: the answer depends on the image alone. Returns the JSON's path."""
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    from mmlm.data.shapes import COLORS, SHAPES

    (out / "img").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        color, shape = list(COLORS)[int(rng.integers(len(COLORS)))], SHAPES[int(rng.integers(len(SHAPES)))]
        side = int(rng.integers(18, 29))
        x0, y0 = (int(v) for v in rng.integers(0, 33 - side, 2))
        x1, y1 = x0 + side - 1, y0 + side - 1
        img = Image.new("RGB", (32, 32), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=COLORS[color])
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=COLORS[color])
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=COLORS[color])
        img.save(out / "img" / f"{i}.png")
        rows.append(
            {
                "image": f"img/{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\nwhat color is the {shape}?"},
                    {"from": "gpt", "value": color},
                ],
            }
        )
    (out / "qa.json").write_text(json.dumps(rows))
    return str(out / "qa.json")


def smol_raw(name: str, smollm2_path, stage: dict) -> dict:
    """A tiny ViT and an MLP connector on SmolLM2 from its GGUF, trained by one ``stage``."""
    return {
        "name": name,
        "model": {
            "encoders": {
                "image": {
                    "type": "timm",
                    "model_name": "vit_tiny_patch16_224",
                    "img_size": 32,
                    "kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2},
                }
            },
            "connectors": {"image": {"type": "mlp", "depth": 2}},
            "llm": {"type": "gguf", "path": str(smollm2_path), "attn_implementation": "sdpa"},
        },
        "processor": {"max_length": 128, "system_prompt": "You describe images."},
        "train": {"seed": 0, "stages": [stage]},
    }


@pytest.fixture(scope="module")
def pipeline(smollm2_path, smollm2, tmp_path_factory):
    data = tmp_path_factory.mktemp("colours")
    stage = {
        "name": "align",
        "data": [{"format": "llava", "path": one_object_world(data / "train", 64, seed=1)}],
        "trainable": ["connectors.*"],
        "lr": 1e-2,
        "steps": 30,
        "batch_size": 2,
        "warmup_steps": 2,
        "save_every": 100,
    }
    raw = smol_raw("smol-vlm", smollm2_path, stage)
    cfg = parse_config(raw)
    torch.manual_seed(0)
    return cfg, build(cfg, llm=smollm2)


def test_processor_uses_the_models_own_chat_template(pipeline):
    cfg, model = pipeline
    proc = model.processor
    assert proc.use_template
    msgs = [{"role": "user", "content": "what color is the circle?"}, {"role": "assistant", "content": "red"}]
    enc = proc.encode(msgs)
    system = [{"role": "system", "content": "You describe images."}]  # processor.system_prompt
    rendered = model.tokenizer.apply_chat_template(system + msgs, tokenize=False)
    assert "<|im_start|>" in rendered
    assert model.tokenizer.decode(enc.input_ids) == rendered
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels, strict=False) if lab != -100]
    assert model.tokenizer.decode(supervised) == "red<|im_end|>\n"


@pytest.mark.parametrize(
    "first",
    [
        [{"role": "user", "content": "what color is the circle?"}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "what color?"}],
        [],  # the conversation opens with the assistant: the template injects its own system prompt
    ],
    ids=["user", "system", "assistant"],
)
def test_only_assistant_content_and_end_of_turn_are_supervised(pipeline, first):
    from mmlm.config import ProcessorConfig
    from mmlm.processor import Processor

    _, model = pipeline
    proc = Processor(model.tokenizer, model.processor.media, ProcessorConfig())  # no system_prompt of ours
    msgs = [
        *first,
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "and the square?"},
        {"role": "assistant", "content": "blue square"},
    ]
    enc = proc.encode(msgs)
    assert model.tokenizer.decode(enc.input_ids) == model.tokenizer.apply_chat_template(msgs, tokenize=False)
    supervised = [t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != -100]
    assert model.tokenizer.decode(supervised) == "red<|im_end|>\nblue square<|im_end|>\n"


def test_alignment_teaches_the_connector_to_show_the_image(pipeline, tmp_path):
    """30 steps on colour questions lower the held-out loss, and the held-out answers come to depend
    on the image: loss with each sample's own image is below the loss with the images shuffled across
    samples, by a margin the untrained connector does not show."""
    cfg, model = pipeline
    held = StageDataset(
        read_llava(LlavaOptions(path=one_object_world(tmp_path / "held", 16, seed=2))), model.processor, "error"
    )
    n = len(held)
    own = [held.load(i) for i in range(n)]
    shuffled = [model.processor.encode(held.records[i].messages, {"image": held.images((i + 1) % n)}) for i in range(n)]

    def loss(samples):  # mean over the supervised tokens of the held-out set
        model.eval()
        b = model.processor.collate(samples)
        with torch.no_grad():
            logits = model(**model.inputs(b)).logits[:, :-1].float()
        labels = b["labels"][:, 1:].reshape(-1)
        ce = torch.nn.functional.cross_entropy(logits.reshape(labels.numel(), -1), labels, reduction="sum")
        return float(ce) / int((labels != -100).sum())

    llm_before = model.llm.model.layers[0].mlp.up_proj.weight.clone()
    before = loss(own)
    gap_before = loss(shuffled) - before
    trained = train(cfg, tmp_path / "run", model=model)
    after = loss(own)
    gap_after = loss(shuffled) - after
    assert trained is model
    print(f"SmolLM2 alignment, held out: loss {before:.3f} -> {after:.3f}, gap {gap_before:.3f} -> {gap_after:.3f}")
    assert after < before - 1.0, (before, after)
    # held-out gaps on 4 seeds: untrained -0.05..0.09, trained 0.34..0.39; 0 when the connector ignores the image
    assert gap_before < 0.12, gap_before  # an untrained connector: the image hardly matters
    assert gap_after > 0.25, (gap_before, gap_after)
    assert torch.equal(model.llm.model.layers[0].mlp.up_proj.weight, llm_before)  # the LLM stayed frozen
    # the checkpoint holds only what differs from the GGUF source: no LLM tensors
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert saved and not any(k.startswith("llm.") for k in saved)
    assert any(k.startswith("connectors.image.") for k in saved)


def test_a_lora_stage_on_smollm2_lowers_the_held_out_loss_and_stores_only_adapters(smollm2, smollm2_path, tmp_path):
    """LoRA on SmolLM2's attention (r 8) plus the connector, 10 steps of colour questions: the held-out
    loss falls, SmolLM2's own weights stay as the GGUF gave them, and the checkpoint holds the
    adapters and the vision side only; it reloads with the same logits."""
    import copy

    import mmlm
    from mmlm.llm import LoadedLLM

    data = tmp_path / "colours"
    stage = {
        "name": "instruct",
        "data": [{"format": "llava", "path": one_object_world(data / "train", 48, seed=1)}],
        "trainable": ["connectors.*"],
        "lora": {"llm": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "lr": 5e-3,
        "steps": 10,
        "batch_size": 2,
        "warmup_steps": 2,
        "save_every": 100,
    }
    raw = smol_raw("smol-lora", smollm2_path, stage)
    cfg = parse_config(raw)
    # the session's SmolLM2 is shared with other tests: adapters go into a copy of it
    llm = LoadedLLM(**{**vars(smollm2), "model": copy.deepcopy(smollm2.model)})
    torch.manual_seed(0)
    model = build(cfg, llm=llm)
    held = StageDataset(
        read_llava(LlavaOptions(path=one_object_world(tmp_path / "held", 12, seed=2))), model.processor, "error"
    )
    batch = model.processor.collate([held.load(i) for i in range(len(held))])

    def loss(m):
        m.eval()
        with torch.no_grad():
            return float(m(**m.inputs(batch), labels=batch["labels"]).loss)

    q_before = model.llm.model.layers[3].self_attn.q_proj.weight.clone()
    before = loss(model)
    trained = train(cfg, tmp_path / "run", model=model)
    after = loss(trained)
    print(f"SmolLM2 + LoRA, held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0, (before, after)
    q = trained.llm.model.layers[3].self_attn.q_proj
    assert torch.equal(q.base_layer.weight, q_before)  # the GGUF's weights did not move
    assert q.lora_B["default"].weight.abs().sum() > 0  # the adapter did
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    llm_saved = [k for k in saved if k.startswith("llm.")]
    assert llm_saved and all(".lora_" in k for k in llm_saved)
    again = mmlm.load(tmp_path / "run" / "final")
    assert loss(again) == pytest.approx(after, abs=1e-5)


def test_the_processors_fast_token_path_gives_the_tokenizers_own_ids(smollm2):
    """Processor._tok calls the Rust tokenizer directly (start-up of a 665k-row data set counts every
    row's tokens); its ids must be what the transformers tokenizer gives, special tokens included."""
    from mmlm.config import ProcessorConfig
    from mmlm.processor import Processor

    proc = Processor(smollm2.tokenizer, {}, ProcessorConfig())
    assert proc._backend is not None
    texts = [
        "what color is the circle?",
        "<|im_start|>user\nhello<|im_end|>\n",
        "  leading spaces, trailing  ",
        "naïve café – 東京 🚀",
        "\n\n",
        "x" * 300,
    ]
    for t in texts:
        assert proc._tok(t) == smollm2.tokenizer(t, add_special_tokens=False)["input_ids"], t
