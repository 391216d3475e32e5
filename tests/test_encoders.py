"""The ``hf`` and ``open_clip`` encoders on tiny models: token counts, preprocessing, and features
equal to a direct forward of the same weights."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mmlm.config import Component, parse_config  # noqa: E402
from mmlm.errors import ConfigError  # noqa: E402
from mmlm.registry import ENCODERS  # noqa: E402
from tests.helpers import TINY_VIT, run_without_open_clip, tiny_raw  # noqa: E402

MEAN = [0.1, 0.2, 0.3]
STD = [0.4, 0.5, 0.6]


def build(kind: str, **opts):
    return ENCODERS.create(Component(type=kind, **opts), where="model.encoders.image")


# ---------------------------------------------------------------------------------------------- hf


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("clip_vision")
    CLIPVisionModel(CLIPVisionConfig(**TINY_VIT)).save_pretrained(d)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    ).save_pretrained(d)
    return d


def test_hf_path_matches_direct_forward_and_drops_cls(clip_dir):
    from transformers import CLIPVisionModel

    enc = build("hf", path=str(clip_dir), select_layers=[-2]).eval()
    assert enc.pretrained is True
    assert enc.num_tokens == 16  # (32 / 8)^2 patches, CLS dropped
    assert enc.hidden_size == 32
    assert enc.preprocess.size == (32, 32)
    assert enc.preprocess.mean.flatten().tolist() == pytest.approx(MEAN)
    assert enc.preprocess.std.flatten().tolist() == pytest.approx(STD)

    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = enc(x)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, want)


def test_hf_multi_layer_follows_select_layers_order(clip_dir):
    from transformers import CLIPVisionModel

    enc = build("hf", path=str(clip_dir), select_layers=[-1, -3]).eval()
    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        hs = ref(x, output_hidden_states=True).hidden_states
        got = enc(x)
    assert isinstance(got, list) and len(got) == 2
    torch.testing.assert_close(got[0], hs[-1][:, 1:])
    torch.testing.assert_close(got[1], hs[-3][:, 1:])
    assert not torch.allclose(got[0], got[1])


def _tower_blocks(enc):
    return next(m for n, m in enc.model.named_modules() if n.endswith("encoder.layers"))


def _block_calls(enc) -> list[int]:
    """Forward calls per block of the encoder's tower during one forward."""
    blocks = list(_tower_blocks(enc))
    calls = [0] * len(blocks)
    for i, b in enumerate(blocks):
        b.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        enc(torch.randn(1, 3, 32, 32))
    return calls


@pytest.mark.parametrize("select", [[-2], [1], [-3, -2]])
def test_hf_blocks_after_the_deepest_selected_layer_are_not_run(clip_dir, select):
    """LLaVA's -2 makes the tower's last block dead work; it is skipped, the features are the whole
    tower's, and the weights stay (the checkpoint and an export see the whole tower)."""
    from transformers import CLIPVisionModel

    enc = build("hf", path=str(clip_dir), select_layers=select).eval()
    n_blocks = TINY_VIT["num_hidden_layers"]
    deepest = max(i % (n_blocks + 1) for i in select)
    calls = _block_calls(enc)
    assert calls == [1] * deepest + [0] * (n_blocks - deepest)
    ref = CLIPVisionModel.from_pretrained(clip_dir).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hs = ref(x, output_hidden_states=True).hidden_states
        got = enc(x)
    got = got if isinstance(got, list) else [got]
    for g, i in zip(got, select, strict=True):
        torch.testing.assert_close(g, hs[i][:, 1:])
    assert set(ref.state_dict()) == {k for k in enc.model.state_dict()}
    assert len(_tower_blocks(enc)) == n_blocks  # restored after the forward


def test_hf_last_layer_selected_runs_every_block(clip_dir):
    enc = build("hf", path=str(clip_dir), select_layers=[-1]).eval()
    assert _block_calls(enc) == [1] * TINY_VIT["num_hidden_layers"]


def test_hf_keep_prefix_tokens(clip_dir):
    enc = build("hf", path=str(clip_dir), drop_prefix_tokens=False)
    assert enc.num_tokens == 17


def test_hf_full_clip_model_uses_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    full = CLIPModel(CLIPConfig(vision_config=TINY_VIT, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    enc = build("hf", path=str(tmp_path)).eval()
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in full.vision_model.parameters())
    # no preprocessor_config.json: CLIP's mean/std and the config's image size
    assert enc.preprocess.size == (32, 32)
    assert enc.preprocess.mean.flatten().tolist() == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:]
        got = enc(x)
    torch.testing.assert_close(got, want)


def test_hf_from_config_siglip_has_no_cls():
    enc = build("hf", config={"model_type": "siglip_vision_model", **TINY_VIT}, select_layers=[-2])
    assert enc.pretrained is False
    assert type(enc.model).__name__ == "SiglipVisionModel"
    assert enc.num_tokens == (32 // 8) ** 2
    assert enc.hidden_size == 32


def test_hf_from_config_image_size_override():
    enc = build("hf", config={"model_type": "siglip_vision_model", **TINY_VIT}, image_size=48)
    assert enc.preprocess.size == (48, 48)
    assert enc.num_tokens == (48 // 8) ** 2


def test_hf_layer_out_of_range_names_the_option(clip_dir):
    with pytest.raises(IndexError, match="select_layers"):
        build("hf", path=str(clip_dir), select_layers=[5])


@pytest.mark.parametrize(
    "opts",
    [
        {"path": "some/model", "config": {"model_type": "clip_vision_model"}},
        {},
    ],
)
def test_hf_needs_exactly_one_of_path_and_config(opts):
    with pytest.raises(ValueError, match="exactly one of 'path'.*'config'"):
        build("hf", **opts)


def test_hf_bad_options_fail_config_validation_with_key_path():
    both = {"path": "a", "config": {"model_type": "clip_vision_model"}}
    with pytest.raises(ConfigError, match=r"model\.encoders\.image: .*exactly one of 'path'") as err:
        ENCODERS.parse("hf", both, "model.encoders.image")
    assert err.value.path == "model.encoders.image"
    with pytest.raises(ConfigError, match="model_type"):
        ENCODERS.parse("hf", {"config": {"hidden_size": 32}}, "model.encoders.image")
    # the same check runs when a whole pipeline config is parsed, before anything is built
    raw = tiny_raw()
    raw["model"]["encoders"]["image"] = {"type": "hf", **both}
    with pytest.raises(ConfigError, match=r"model\.encoders\.image: .*exactly one of 'path'"):
        parse_config(raw)


# ----------------------------------------------------------------------------------------- open_clip

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
NAME = "mmlm-test-tiny-vit"


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    """A full tiny open_clip state dict, built through open_clip's own config registration."""
    open_clip = pytest.importorskip("open_clip")
    d = tmp_path_factory.mktemp("open_clip")
    (d / f"{NAME}.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / f"{NAME}.json")
    torch.manual_seed(1)
    model = open_clip.create_model(NAME)
    torch.save(model.state_dict(), d / "tiny.pt")
    return d / "tiny.pt"


def test_open_clip_matches_manual_forward(clip_weights):
    open_clip = pytest.importorskip("open_clip")

    enc = build("open_clip", model_name=NAME, model_config=TINY_CLIP, weights=str(clip_weights)).eval()
    assert enc.pretrained is True
    assert enc.num_tokens == 16
    assert enc.hidden_size == 32
    assert enc.preprocess.size == (32, 32)
    assert enc.preprocess.mean.flatten().tolist() == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN))
    assert not any(n.startswith("text") or ".text" in n for n, _ in enc.named_parameters())

    # manual forward of the same weights: embeddings, blocks, drop the class token
    model = open_clip.create_model(NAME)
    model.load_state_dict(torch.load(clip_weights, weights_only=True))
    v = model.visual.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = v._embeds(x)
        for blk in v.transformer.resblocks:
            h = blk(h)
        want = h[:, 1:]
        got = enc(x)
    assert got.shape == (2, 16, 32)
    torch.testing.assert_close(got, want)


def test_open_clip_weights_are_deterministic_and_matter(clip_weights):
    x = torch.randn(1, 3, 32, 32)
    outs = []
    # different init seeds for the two builds with weights (only the file can make them agree);
    # the same seed for the first and the build without weights (only the file can make them differ)
    for seed, weights in ((123, str(clip_weights)), (456, str(clip_weights)), (123, None)):
        torch.manual_seed(seed)
        enc = build("open_clip", model_name=NAME, model_config=TINY_CLIP, weights=weights).eval()
        with torch.no_grad():
            outs.append(enc(x))
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])
    assert enc.pretrained is False


def test_open_clip_multi_layer_order(clip_weights):
    enc = build(
        "open_clip", model_name=NAME, model_config=TINY_CLIP, weights=str(clip_weights), select_layers=[-1, -2]
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got = enc(x)
        v = enc.visual
        first = v.transformer.resblocks[0](v._embeds(x))
        last = v.transformer.resblocks[1](first)
    assert isinstance(got, list) and len(got) == 2
    torch.testing.assert_close(got[0], last[:, 1:])
    torch.testing.assert_close(got[1], first[:, 1:])


def test_open_clip_unknown_model_and_missing_weights():
    pytest.importorskip("open_clip")
    with pytest.raises(ValueError, match="no model 'not-a-clip'"):
        build("open_clip", model_name="not-a-clip")
    with pytest.raises(FileNotFoundError, match="weights"):
        build("open_clip", model_name=NAME, model_config=TINY_CLIP, weights="/nonexistent/w.pt")


def test_open_clip_module_imports_without_open_clip():
    # a fresh interpreter where `import open_clip` fails (the GPU machine has no open_clip)
    code = (
        "from mmlm.registry import ENCODERS\n"
        "entry = ENCODERS.get('open_clip')\n"
        "try:\n"
        "    entry.target(ENCODERS.parse('open_clip', {'model_name': 'ViT-B-32'}, 'model.encoders.image'))\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
    )
    res = run_without_open_clip(code)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "pip install open-clip-torch" in res.stdout
