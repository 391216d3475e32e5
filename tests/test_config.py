from pathlib import Path

import pytest

from mmlm.config import apply_override, load_config, parse_config
from mmlm.errors import ConfigError
from tests.helpers import tiny_raw

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_connector_names_key_path_and_choices():
    raw = tiny_raw()
    raw["model"]["connectors"]["image"]["type"] = "mlpx"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "model.connectors.image.type" in msg
    assert "mlpx" in msg and "mlp" in msg.split("valid choices:")[1]
    assert e.value.path == "model.connectors.image.type"


def test_unknown_key_and_wrong_type_name_full_path():
    raw = tiny_raw("/tmp/none")
    raw["train"]["stages"][1]["lrr"] = 1.0
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "train.stages.1.lrr" in str(e.value) and "unknown key" in str(e.value)

    raw = tiny_raw("/tmp/none")
    raw["train"]["stages"][0]["batch_size"] = "many"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "train.stages.0.batch_size" in str(e.value)


def test_component_option_errors_name_path_and_valid_keys():
    raw = tiny_raw()
    raw["model"]["connectors"]["image"]["depht"] = 3
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "model.connectors.image.depht" in str(e.value)
    assert "depth" in str(e.value)  # the valid keys are listed

    raw = tiny_raw()
    raw["model"]["connectors"]["image"]["activation"] = "swish"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "model.connectors.image.activation" in str(e.value) and "gelu" in str(e.value)

    raw = tiny_raw()
    raw["model"]["llm"]["attn_implementation"] = "fast"
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    assert "model.llm.attn_implementation" in str(e.value) and "sdpa" in str(e.value)


def test_unknown_encoder_and_data_format():
    raw = tiny_raw("/tmp/x")
    raw["model"]["encoders"]["image"]["type"] = "resnet"
    with pytest.raises(ConfigError, match=r"model\.encoders\.image\.type.*valid choices:.*timm"):
        parse_config(raw)
    raw = tiny_raw("/tmp/x")
    raw["train"]["stages"][1]["data"][0]["format"] = "csv"
    with pytest.raises(ConfigError, match=r"train\.stages\.1\.data\.0\.format.*llava"):
        parse_config(raw)


def test_overrides_by_index_and_stage_name():
    cfg = parse_config(
        tiny_raw("/tmp/x"), ["train.stages.1.lr=2e-5", "train.stages.align.steps=9", "processor.padding_side=left"]
    )
    assert cfg.train.stages[1].lr == pytest.approx(2e-5)
    assert cfg.train.stages[0].steps == 9
    assert cfg.processor.padding_side == "left"
    raw = tiny_raw("/tmp/x")
    with pytest.raises(ConfigError, match="out of range"):
        apply_override(raw, "train.stages.5.lr=1")
    with pytest.raises(ConfigError, match="no list item named 'nope'"):
        apply_override(raw, "train.stages.nope.lr=1")


def test_stage_needs_steps_or_epochs():
    raw = tiny_raw("/tmp/x")
    del raw["train"]["stages"][0]["steps"]
    with pytest.raises(ConfigError, match=r"train\.stages\.0.*exactly one of 'steps' or 'epochs'"):
        parse_config(raw)


def test_encoder_without_connector_is_reported():
    raw = tiny_raw()
    del raw["model"]["connectors"]["image"]
    with pytest.raises(ConfigError, match="add model.connectors.image"):
        parse_config(raw)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_recipe_validates_and_variables_resolve(tmp_path, recipe):
    cfg = load_config(f"configs/{recipe}", variables={"out": str(tmp_path)})
    paths = [src.options()["path"] for st in cfg.train.stages for src in st.data]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths)


def test_dimension_mismatch_is_caught_at_build_with_both_sizes():
    from mmlm.model import build
    from tests.helpers import TEXTS

    raw = tiny_raw()
    raw["model"]["connectors"]["image"]["in_dim"] = 48  # the encoder gives 32
    cfg = parse_config(raw)
    with pytest.raises(ValueError) as e:
        build(cfg, texts=TEXTS)
    assert "48" in str(e.value) and "32" in str(e.value) and "model.connectors.image.in_dim" in str(e.value)


def test_modality_names_are_checked_by_validation_not_at_build():
    raw = tiny_raw()
    raw["model"]["encoders"]["imgae"] = raw["model"]["encoders"].pop("image")
    raw["model"]["connectors"]["imgae"] = raw["model"]["connectors"].pop("image")
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert err.value.path == "model.encoders"
    assert "unknown modality 'imgae'; valid choices: image, audio" in str(err.value)


def test_eval_every_needs_an_eval_section():
    raw = tiny_raw("/unused")
    raw["train"]["stages"][1]["eval_every"] = 2
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert "train.stages.1.eval_every" in str(err.value) and "train.eval" in str(err.value)
