"""Dynamic tiling (InternVL 2.5) with NVLM-D tile tags: ALGORITHMS.md's grid table, tiles cut
row-major from the resized image, tags as plain text tokens in order, and a tiled model whose
placeholder runs (known from the image size before any forward) match its encoder inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.config import parse_config
from mmlm.model import build
from mmlm.vision.tiling import TilingOptions, choose_grid, tile_count, tile_image, tile_tags
from tests.helpers import tiny_raw


@pytest.mark.parametrize(
    ("size", "grid", "tiles"),
    [((800, 600), (4, 3), 13), ((1920, 1080), (4, 2), 9), ((1000, 1000), (3, 3), 10), ((448, 448), (1, 1), 1)],
)
def test_the_grid_table_of_algorithms_md(size, grid, tiles):
    assert choose_grid(*size, tile=448, max_tiles=12) == grid
    assert tile_count(*size, 448, TilingOptions(max_tiles=12)) == tiles


def test_tiles_are_cut_row_major_from_the_resized_image_then_the_thumbnail():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))  # 90 wide, 60 tall: 3:2
    opts = TilingOptions(max_tiles=6)
    tiles = tile_image(img, 16, opts)
    cols, rows = choose_grid(90, 60, 16, 1, 6)
    assert (cols, rows) == (3, 2) and len(tiles) == 7
    resized = np.asarray(img.resize((48, 32), Image.BICUBIC))
    for k, t in enumerate(tiles[:6]):
        r, c = divmod(k, cols)
        assert np.array_equal(np.asarray(t), resized[16 * r : 16 * r + 16, 16 * c : 16 * c + 16])
    assert np.array_equal(np.asarray(tiles[6]), np.asarray(img.resize((16, 16), Image.BICUBIC)))
    assert len(tile_image(img, 16, TilingOptions(max_tiles=6, thumbnail=False))) == 6


def test_tags_name_each_tile_and_the_thumbnail():
    opts = TilingOptions(tags="nvlm")
    assert tile_tags(5, opts) == ["<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_global_thumbnail>"]
    assert tile_tags(1, opts) == ["<tile_1>"]
    assert tile_tags(3, TilingOptions()) == ["", "", ""]


def tiled_model(tags="nvlm", max_tiles=4):
    raw = tiny_raw()
    raw["model"]["encoders"]["image"]["tiling"] = {"max_tiles": max_tiles, "tags": tags}
    raw["processor"]["max_length"] = 512
    torch.manual_seed(0)
    words = ["what", "is", "here", "?", "<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_global_thumbnail>"]
    return build(parse_config(raw), texts=[" ".join(words)])


def test_a_tiled_image_takes_one_placeholder_run_per_tile_after_its_tag(tmp_path):
    model = tiled_model()
    proc, spec = model.processor, model.processor.media["image"]
    wide, square = Image.new("RGB", (64, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))
    msgs = [{"role": "user", "content": "<image>\nwhat is here ?"}]
    enc_wide = proc.encode(msgs, {"image": [wide]}, add_generation_prompt=True)
    enc_sq = proc.encode(msgs, {"image": [square]}, add_generation_prompt=True)
    n_wide = tile_count(64, 32, 32, spec.tiling)  # 2x1 grid + thumbnail
    assert n_wide == 3 and len(enc_wide.media["image"]) == 3 and len(enc_sq.media["image"]) == 1
    ids = enc_wide.input_ids
    assert ids.count(spec.token_id) == 3 * spec.num_tokens
    # each run is preceded by its tag's ordinary text tokens, in order
    tags = tile_tags(3, spec.tiling)
    starts = [i for i, t in enumerate(ids) if t == spec.token_id and (i == 0 or ids[i - 1] != spec.token_id)]
    for tag, start in zip(tags, starts, strict=True):
        tag_ids = proc._tok(tag)
        assert tag_ids and ids[start - len(tag_ids) : start] == tag_ids
        assert all(t >= 0 for t in tag_ids)  # text, not media
    # the length is known from the size alone, as the data filter computes it
    conv = [*msgs, {"role": "assistant", "content": "red"}]
    full = proc.encode(conv, {"image": [wide]})
    assert proc.count_tokens(conv, {"image": [(64, 32)]}) == len(full.input_ids)
    with pytest.raises(Exception, match="tiled"):
        proc.count_tokens(conv)


def test_a_batch_of_differently_tiled_images_runs_and_each_tile_matters():
    model = tiled_model().eval()
    a, b = Image.new("RGB", (64, 32), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))
    batch = model.processor(
        [[{"role": "user", "content": "<image>\nwhat is here ?"}]] * 2, [{"image": [a]}, {"image": [b]}]
    )
    assert batch["pixel_values"].shape[0] == 3 + 1
    with torch.no_grad():
        out = model(**model.inputs(batch)).logits
    changed = batch["pixel_values"].clone()
    changed[1] = 0  # the wide image's second tile
    with torch.no_grad():
        out2 = model(**{**model.inputs(batch), "pixel_values": changed}).logits
    assert not torch.allclose(out[0], out2[0]) and torch.allclose(out[1], out2[1])


def test_bad_tiling_options_are_config_errors_naming_the_key():
    from mmlm.errors import ConfigError

    raw = tiny_raw()
    raw["model"]["encoders"]["image"]["tiling"] = {"max_tiles": 2, "min_tiles": 3}
    with pytest.raises(ConfigError, match="tiling"):
        parse_config(raw)
    raw["model"]["encoders"]["image"]["tiling"] = {"max_tile": 4}
    with pytest.raises(ConfigError, match="max_tile"):
        parse_config(raw)
