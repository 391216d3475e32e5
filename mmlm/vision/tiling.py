"""Dynamic high-resolution tiling (InternVL 2.5) with 1-D tile tags (NVLM-D), for any image encoder.

``tiling: {max_tiles: 12}`` in an image encoder's config: each image is resized to the grid of
encoder-sized tiles whose aspect ratio is closest to its own (``choose_grid``), cut row-major into
tiles, and, when there is more than one tile, followed by a thumbnail of the whole image. Each
tile is one encoder input: the processor writes one run of placeholders per tile, so the number of
LLM positions an image takes is known from its size before any forward. With ``tags: nvlm`` each
tile's run is preceded by the plain text ``<tile_k>`` (the thumbnail's by
``<tile_global_thumbnail>``), tokenised as ordinary text (../shared/ALGORITHMS.md, "High resolution").
"""

from __future__ import annotations

from typing import Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TilingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_tiles: int = Field(1, ge=1)  # the fewest tiles a grid may have
    max_tiles: int = Field(12, ge=1)  # the most tiles a grid may have (the thumbnail not counted)
    thumbnail: bool = True  # a whole-image tile after the grid when the grid has more than one tile
    tags: Literal["none", "nvlm"] = "none"  # NVLM-D's plain-text tile tags before each tile

    @model_validator(mode="after")
    def _order(self):
        if self.min_tiles > self.max_tiles:
            raise ValueError(f"min_tiles {self.min_tiles} is above max_tiles {self.max_tiles}")
        return self


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) with min <= columns * rows <= max, by area (InternVL's order)."""
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width: int, height: int, tile: int, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; on a tie the larger grid when the
    image has more than half its pixels (InternVL 2.5's ``find_closest_aspect_ratio``)."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_count(width: int, height: int, tile: int, opts: TilingOptions) -> int:
    cols, rows = choose_grid(width, height, tile, opts.min_tiles, opts.max_tiles)
    n = cols * rows
    return n + (1 if opts.thumbnail and n > 1 else 0)


def tile_image(image: Image.Image, tile: int, opts: TilingOptions, resample=Image.BICUBIC) -> list[Image.Image]:
    """The image's tiles, row-major, then its thumbnail (when there is more than one tile)."""
    cols, rows = choose_grid(image.width, image.height, tile, opts.min_tiles, opts.max_tiles)
    resized = image.resize((tile * cols, tile * rows), resample)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    if opts.thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), resample))
    return tiles


def tile_tags(n_tiles: int, opts: TilingOptions) -> list[str]:
    """The text before each tile's run: ``<tile_1>`` ... and ``<tile_global_thumbnail>``; empty
    strings without tags."""
    if opts.tags == "none":
        return [""] * n_tiles
    has_thumb = opts.thumbnail and n_tiles > 1
    grid = n_tiles - 1 if has_thumb else n_tiles
    return [f"<tile_{k + 1}>" for k in range(grid)] + (["<tile_global_thumbnail>"] if has_thumb else [])
