"""core.tiling: tile layouts on the 16-px grid, blend weights that sum to 1, bounded seams."""
from __future__ import annotations

import math

import pytest
import torch

from zimage_nodes.core.tiling import Ramp, TileLayout, axis, blend, crop

# (length, tile, overlap) sweeps, in pixels; small enough to run in about a second.
SWEEP = [(n, t, o) for n in range(16, 1200, 16) for t in range(32, 400, 16) for o in range(0, t // 2 + 1, 16)]


def test_axis_tiles_are_equal_aligned_inside_and_overlap_at_least_as_asked():
    for n, t, o in SWEEP:
        a = axis(n, t, o)
        assert a.size <= t and a.size % 16 == 0
        assert a.starts[0] == 0 and a.ends[-1] == n, (n, t, o, a)
        assert all(s % 16 == 0 for s in a.starts)
        assert list(a.starts) == sorted(set(a.starts))
        overlaps = [a.ends[i] - a.starts[i + 1] for i in range(len(a.starts) - 1)]
        assert all(ov >= o for ov in overlaps), (n, t, o, a)
        # the fewest tiles that can keep the overlap: one less would not cover the axis
        k = len(a.starts)
        assert k == 1 or (k - 1) * t - (k - 2) * o < n
        assert a.max_cover() <= 3  # never four tiles on one pixel


def test_examples_users_meet():
    assert repr(TileLayout(4096, 4096, 1024, 128)) == \
        "TileLayout(4096x4096: 5x5 tiles of 928x928, overlap >= 128)"
    assert repr(TileLayout(2048, 2048, 1024, 128)) == "TileLayout(2048x2048: 3x3 tiles of 768x768, overlap >= 128)"
    assert repr(TileLayout(1024, 1024, 1024, 128)) == "TileLayout(1024x1024: 1x1 tiles of 1024x1024, overlap >= 128)"
    lay = TileLayout(8192, 4096, 1024, 128)
    assert (lay.tile_w, lay.tile_h, len(lay)) == (1024, 928, 9 * 5)
    # smaller than one tile: one tile of the image's size
    assert repr(TileLayout(320, 192, 1024, 128)) == "TileLayout(320x192: 1x1 tiles of 320x192, overlap >= 128)"


def _weight_sum(layout: TileLayout, ramp: Ramp) -> torch.Tensor:
    total = torch.zeros(layout.height, layout.width, dtype=torch.float64)
    weight = layout.weight_fn(ramp)
    for tile in layout.tiles:
        w = weight(tile)
        assert w.shape == (tile.h, tile.w) and (w >= 0).all() and (w <= 1).all()
        total[tile.rows, tile.cols] += w.double()
    return total


LAYOUTS = [(2048, 2048, 1024, 128), (2048, 1024, 1024, 128), (512, 512, 256, 64), (800, 592, 256, 112),
           (1200, 304, 160, 80), (512, 512, 256, 0), (1008, 656, 400, 160)]


@pytest.mark.parametrize("ramp", list(Ramp))
@pytest.mark.parametrize("size", LAYOUTS)
def test_blend_weights_sum_to_one_on_every_output_pixel(size, ramp):
    """Every pixel of the output gets weights summing to 1, for tiles that meet in pairs, tiles where
    three overlap (800x592 tile 256/112), no overlap at all, and the same layout in latent cells."""
    layout = TileLayout(*size)
    assert torch.allclose(_weight_sum(layout, ramp), torch.ones(layout.height, layout.width, dtype=torch.float64),
                          atol=1e-6)
    latent = layout.scaled(8)
    assert torch.allclose(_weight_sum(latent, ramp), torch.ones(latent.height, latent.width, dtype=torch.float64),
                          atol=1e-6)


def test_axis_weights_sum_to_one_over_the_whole_sweep():
    for n, t, o in SWEEP[::7]:
        a = axis(n, t, o)
        total = torch.zeros(n, dtype=torch.float64)
        for s, w in zip(a.starts, a.weights(Ramp.LINEAR)):
            total[s:s + a.size] += w
        assert torch.allclose(total, torch.ones(n, dtype=torch.float64)), (n, t, o)


def _offset_image(layout: TileLayout, offsets: torch.Tensor, ramp: Ramp) -> torch.Tensor:
    pieces = [torch.full((1, t.h, t.w, 1), float(offsets[t.index])) for t in layout.tiles]
    return blend(pieces, layout, ramp, channels_last=True)[0, :, :, 0].double()


def _max_neighbour_difference(layout: TileLayout, offsets: torch.Tensor) -> float:
    nx, ny = len(layout.x_axis.starts), len(layout.y_axis.starts)
    grid = offsets.view(ny, nx)
    d = 0.0
    if nx > 1:
        d = max(d, float((grid[:, 1:] - grid[:, :-1]).abs().max()))
    if ny > 1:
        d = max(d, float((grid[1:] - grid[:-1]).abs().max()))
    return d


def _max_step(img: torch.Tensor) -> float:
    return max(float((img[:, 1:] - img[:, :-1]).abs().max()), float((img[1:] - img[:-1]).abs().max()))


@pytest.mark.parametrize("size", [s for s in LAYOUTS if s[3] > 0])
def test_constant_tile_offsets_give_no_step_above_difference_over_overlap(size):
    """Tiles that each carry a different constant: with feather blending no two neighbouring output
    pixels differ by more than (largest neighbouring-tile difference) / overlap; the cosine ramp is
    smoother at the ends but up to pi/2 steeper in the middle. (1008x656 tile 400/160 has tile < 2.5 x
    overlap: its transitions are narrower than the overlap where three tiles meet, and the bound is
    offset difference / min_transition.)"""
    layout = TileLayout(*size)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        offsets = torch.rand(len(layout), generator=g, dtype=torch.float64) * 10
        d = _max_neighbour_difference(layout, offsets)
        width = min(layout.overlap, layout.min_transition)
        if size[2] >= 2.5 * size[3]:
            assert width == layout.overlap
        feather = _offset_image(layout, offsets, Ramp.LINEAR)
        cosine = _offset_image(layout, offsets, Ramp.COSINE)
        assert _max_step(feather) <= d / width + 1e-5  # float32 canvas
        assert _max_step(cosine) <= math.pi / 2 * d / width + 1e-5
        # a constant image is reproduced where all tiles agree
        assert torch.allclose(_offset_image(layout, torch.full_like(offsets, 3.0), Ramp.LINEAR),
                              torch.full((layout.height, layout.width), 3.0, dtype=torch.float64), atol=1e-5)


def test_steps_are_bounded_by_the_narrowest_transition_over_the_whole_sweep():
    """1D over the sweep: step <= difference / min_transition everywhere, and min_transition >= overlap
    whenever tile >= 2.5 x overlap (the layouts users get by default have tile = 8 x overlap)."""
    g = torch.Generator().manual_seed(1)
    for n, t, o in SWEEP[::5]:
        a = axis(n, t, o)
        if len(a.starts) == 1 or o == 0:
            continue
        width = a.min_transition()
        if t >= 2.5 * o:
            assert width >= o, (n, t, o, a)
        offsets = torch.rand(len(a.starts), generator=g, dtype=torch.float64)
        value = torch.zeros(n, dtype=torch.float64)
        for k, (s, w) in enumerate(zip(a.starts, a.weights(Ramp.LINEAR))):
            value[s:s + a.size] += w * offsets[k]
        d = float((offsets[1:] - offsets[:-1]).abs().max())
        assert float((value[1:] - value[:-1]).abs().max()) <= d / width * (1 + 1e-9), (n, t, o)


@pytest.mark.parametrize("channels_last", [True, False])
def test_blending_the_tiles_of_an_image_gives_the_image_back(channels_last):
    """The cut-and-blend machinery is exact: crops of an image blended with the layout's weights
    reproduce the image (float32 rounding only)."""
    layout = TileLayout(800, 592, 256, 64)
    shape = (1, 592, 800, 3) if channels_last else (1, 4, 592, 800)
    image = torch.rand(shape)
    for ramp in Ramp:
        out = blend([crop(image, t, channels_last) for t in layout.tiles], layout, ramp, channels_last)
        assert torch.allclose(out, image, atol=2e-6, rtol=0)


def test_layout_rejects_what_it_cannot_tile():
    with pytest.raises(ValueError):
        TileLayout(1000, 1024, 1024, 128)   # not a multiple of 16
    with pytest.raises(ValueError):
        TileLayout(1024, 1024, 256, 144)    # tile < 2 x overlap
    with pytest.raises(ValueError):
        TileLayout(1024, 1024, 256, 100)    # overlap off the grid
