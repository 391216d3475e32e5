"""A genuine pretrained LLM: SmolLM2-135M-Instruct from its GGUF file as the LLM of a VLM."""

import pytest
import torch

from mmlm.config import parse_config
from mmlm.data.dataset import StageDataset
from mmlm.data.sources import read_source
from mmlm.model import build
from mmlm.train.runner import train


@pytest.fixture(scope="module")
def pipeline(smollm2_path, smollm2, tmp_path_factory):
    data = tmp_path_factory.mktemp("shapes")
    raw = {
        "name": "smol-vlm",
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
        "train": {
            "seed": 0,
            "stages": [
                {
                    "name": "align",
                    "data": [
                        {
                            "format": "shapes",
                            "path": str(data),
                            "n": 48,
                            "seed": 4,
                            "image_size": 32,
                            "task": "captions",
                        }
                    ],
                    "trainable": ["connectors.*"],
                    "lr": 2e-3,
                    "steps": 20,
                    "batch_size": 2,
                    "warmup_steps": 2,
                    "save_every": 100,
                }
            ],
        },
    }
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


def test_twenty_step_alignment_lowers_the_loss(pipeline, tmp_path):
    cfg, model = pipeline
    st = cfg.train.stages[0]
    ds = StageDataset(read_source(st.data[0]), model.processor, "error")
    batches = [model.processor.collate([ds.load(i) for i in range(j, j + 4)]) for j in (0, 4)]

    def mean_loss():
        model.eval()
        with torch.no_grad():
            return sum(float(model(**model.inputs(b), labels=b["labels"]).loss) for b in batches) / len(batches)

    llm_before = model.llm.model.layers[0].mlp.up_proj.weight.clone()
    before = mean_loss()
    trained = train(cfg, tmp_path / "run", model=model)
    after = mean_loss()
    assert trained is model
    print(f"SmolLM2 alignment: loss {before:.3f} -> {after:.3f}")
    assert after < before - 0.5, (before, after)
    assert torch.equal(model.llm.model.layers[0].mlp.up_proj.weight, llm_before)  # the LLM stayed frozen
    # the checkpoint holds only what differs from the GGUF source: no LLM tensors
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert saved and not any(k.startswith("llm.") for k in saved)
    assert any(k.startswith("connectors.image.") for k in saved)
