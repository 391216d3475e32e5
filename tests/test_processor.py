import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.config import ProcessorConfig
from mmlm.errors import SampleError, SampleTooLong
from mmlm.llm import TokenizerSpec, train_tokenizer
from mmlm.processor import IGNORE_INDEX, MediaSpec, Processor
from mmlm.vision._base import ImageTransform
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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)


def _wide() -> Image.Image:
    """96 x 32: a red left third, a green centre, a blue right third (its halves differ)."""
    a = np.zeros((32, 96, 3), dtype=np.uint8)
    a[:, :32, 0] = 255
    a[:, 32:64, 1] = 255
    a[:, 64:, 2] = 255
    return Image.fromarray(a)


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """Normalised pixels back to [0, 1] colours."""
    return x * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)


def _is(x: torch.Tensor, colour, tol=0.02) -> bool:
    return bool((x - torch.tensor(colour).view(3, *[1] * (x.ndim - 1))).abs().max() < tol)


def test_resize_squash_keeps_both_sides_crop_keeps_the_centre_pad_adds_mean_bands():
    t = ImageTransform((32, 32), CLIP_MEAN, CLIP_STD)
    squash, crop, pad = (t(_wide(), resize=m) for m in ("squash", "crop", "pad"))
    assert squash.shape == crop.shape == pad.shape == (3, 32, 32)
    s = _rgb(squash)
    assert _is(s[:, :, :8], RED) and _is(s[:, :, 13:19], GREEN) and _is(s[:, :, -8:], BLUE)
    assert _is(_rgb(crop), GREEN, tol=1e-4)  # the centre third only: no red, no blue anywhere
    # pad: the image in the middle rows, the mean colour above and below (normalised to ~0)
    assert pad[:, :8].abs().max() < 0.01 and pad[:, -8:].abs().max() < 0.01
    mid = _rgb(pad)[:, 14:18]
    assert _is(mid[:, :, :8], RED) and _is(mid[:, :, -8:], BLUE)
    assert torch.equal(t(_wide()), squash)  # squash is the default


def test_every_resize_mode_on_an_image_of_the_target_aspect_equals_squash():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    t = ImageTransform((32, 32), CLIP_MEAN, CLIP_STD)
    for mode in ("pad", "crop"):
        assert torch.equal(t(img, resize=mode), t(img, resize="squash")), mode


def test_a_non_square_input_size_pads_and_crops_to_its_own_aspect():
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[:8] = 255  # a white top quarter
    t = ImageTransform((16, 32), CLIP_MEAN, CLIP_STD)  # H 16, W 32: wider than the image
    pad = t(Image.fromarray(a), resize="pad")
    assert pad.shape == (3, 16, 32)
    assert pad[:, :, :6].abs().max() < 0.01 and pad[:, :, -6:].abs().max() < 0.01  # bands left and right
    crop = _rgb(t(Image.fromarray(a), resize="crop"))  # rows 8..24 kept: the white quarter is gone
    assert crop.shape == (3, 16, 32) and _is(crop, (0.0, 0.0, 0.0), tol=1e-4)


def test_processor_resize_reaches_batches_and_ask_and_survives_a_checkpoint(tmp_path, monkeypatch):
    import mmlm
    from mmlm.model import build
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = build(tiny_config(overrides=["processor.resize=crop"]), texts=TEXTS)
    enc = model.encoders["image"].preprocess
    batch = model.processor([{"role": "user", "content": "<image>\nwhat color?"}], {"image": [_wide()]})
    assert torch.equal(batch["pixel_values"][0], enc(_wide(), resize="crop"))
    assert not torch.equal(batch["pixel_values"][0], enc(_wide()))
    seen = []
    call = ImageTransform.__call__
    monkeypatch.setattr(
        ImageTransform, "__call__", lambda self, im, resize="squash": seen.append(resize) or call(self, im, resize)
    )
    model.ask("what color is the circle?", _wide(), max_new_tokens=1)
    assert seen == ["crop"]
    model.save(tmp_path / "ck")
    assert mmlm.load(tmp_path / "ck").processor.config.resize == "crop"


def test_an_unknown_resize_mode_is_a_config_error_naming_the_key():
    from mmlm.config import parse_config
    from mmlm.errors import ConfigError
    from tests.helpers import tiny_raw

    raw = tiny_raw()
    assert parse_config(raw).processor.resize == "squash"
    raw["processor"]["resize"] = "stretch"
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "processor.resize" in str(err.value) and "'stretch'" in str(err.value)


def test_the_fast_token_path_gives_the_word_tokenizers_own_ids(tok):
    proc = Processor(tok, {}, ProcessorConfig())
    assert proc._backend is not None
    for t in [*TEXTS, "an unknown zebra word", "  spaced   out  ", "<|user|> hi"]:
        assert proc._tok(t) == tok(t, add_special_tokens=False)["input_ids"], t
