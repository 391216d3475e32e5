import pytest
import torch
from PIL import Image

from mmlm.config import ProcessorConfig
from mmlm.errors import SampleError, SampleTooLong
from mmlm.llm import TokenizerSpec, train_tokenizer
from mmlm.processor import IGNORE_INDEX, MediaSpec, Processor
from tests.helpers import TEXTS

N_IMG = 5


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, TokenizerSpec(type="word", vocab_size=100))


def make(tok, **cfg):
    spec = MediaSpec.of("image", N_IMG, lambda im: torch.zeros(3, 4, 4))
    return Processor(tok, {"image": spec}, ProcessorConfig(**cfg))


CONV = [
    {"role": "user", "content": "<image>\nwhat color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "what shape is the red object?"},
    {"role": "assistant", "content": "circle"},
]


def test_labels_supervise_exactly_the_assistant_tokens(tok):
    p = make(tok)
    enc = p.encode(CONV, {"image": [Image.new("RGB", (4, 4))]})
    sup = [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    supervised_ids = [enc.input_ids[i] for i in sup]
    end = tok.convert_tokens_to_ids("<|end|>")
    expected = (
        tok("red", add_special_tokens=False)["input_ids"]
        + [end]
        + tok("circle", add_special_tokens=False)["input_ids"]
        + [end]
    )
    assert supervised_ids == expected
    for i in sup:  # labels equal the ids where supervised
        assert enc.labels[i] == enc.input_ids[i]
    # user text (including the question words) is never supervised
    q_ids = set(tok("what color is the", add_special_tokens=False)["input_ids"])
    assert not q_ids & set(supervised_ids)


def test_placeholder_expanded_to_num_tokens_and_masked(tok):
    p = make(tok)
    enc = p.encode(CONV, {"image": [Image.new("RGB", (4, 4))]})
    pos = [i for i, t in enumerate(enc.input_ids) if t == -200]
    assert len(pos) == N_IMG
    assert pos == list(range(pos[0], pos[0] + N_IMG))  # one contiguous run
    assert all(enc.labels[i] == IGNORE_INDEX for i in pos)
    # length = text-only length - 0 + N (the marker itself contributes no text token)
    text_only = p.encode([{"role": "user", "content": "what color is the circle?"}, CONV[1], CONV[2], CONV[3]])
    assert len(enc.input_ids) == len(text_only.input_ids) + N_IMG


def test_overlong_sample_rejected_with_its_full_length_not_truncated(tok):
    # the index and file in the message are tested through the trainer (tests/test_train.py)
    full = len(make(tok).encode(CONV, {"image": [Image.new("RGB", (4, 4))]}).input_ids)
    assert full > 20
    with pytest.raises(SampleTooLong) as e:
        make(tok, max_length=20).encode(CONV, {"image": [Image.new("RGB", (4, 4))]})
    assert e.value.length == full and f"{full} tokens" in str(e.value) and "max_length=20" in str(e.value)


def test_media_count_mismatch_is_an_error(tok):
    p = make(tok)
    with pytest.raises(SampleError, match="1 <image> placeholder.*2 image"):
        p.encode(CONV, {"image": [Image.new("RGB", (4, 4))] * 2})


def test_left_and_right_padding(tok):
    p = make(tok)
    a = p.encode([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "red"}])
    b = p.encode(CONV[2:], None)
    for side in ("left", "right"):
        batch = p.collate([a, b], padding_side=side)
        m = batch["attention_mask"]
        short = 0 if len(a.input_ids) < len(b.input_ids) else 1
        row = m[short]
        if side == "left":
            assert row[0] == 0 and row[-1] == 1
        else:
            assert row[0] == 1 and row[-1] == 0
        # real tokens keep their order and positions start at 0 after padding
        ids = batch["input_ids"][short][row.bool()].tolist()
        assert ids == (a if short == 0 else b).input_ids
        assert batch["position_ids"][short][row.bool()].tolist() == list(range(int(row.sum())))
        assert (batch["labels"][short][~row.bool()] == IGNORE_INDEX).all()


def test_generation_prompt_ends_with_assistant_marker(tok):
    p = make(tok)
    batch = p([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    assert batch["input_ids"][0, -1].item() == tok.convert_tokens_to_ids("<|assistant|>")
