"""Tile layouts and blending for the tiled upscaler: plain integer math and torch, no ComfyUI.

A ``TileLayout`` cuts a ``width x height`` image into equal tiles of at most ``tile`` pixels a side,
every start and size a multiple of ``align`` (16: the VAE's 8 times the DiT's 2x2 patch), all inside
the image, neighbours overlapping by at least ``overlap`` pixels. Per axis the tile count is the
smallest that covers the image; the tiles are then shrunk to the smallest equal size that keeps the
requested overlap and spread evenly (so a 2048 image with tile 1024 / overlap 128 gets 3 tiles of 768,
not 2 tiles of 1024 meeting with a 0 px overlap, nor a third tile pushed against the border).

Blend weights are a partition of unity by construction, per axis: between two consecutive tiles one
*transition* ramps the later tile from 0 to 1 (and the earlier one from 1 to 0) across their overlap;
elsewhere exactly one tile has weight 1. Where three tiles overlap (tiles under about 2.5x the
overlap), the two transitions are cut at one point so they do not overlap: every pixel sees at most
two tiles per axis and the weights still sum to 1. A tile's 2D weight is the product of its two axis
weights, so the 2D weights sum to 1 as well.

With the linear (feather) ramp across a transition of ``L`` pixels the blended value moves by at most
``1/L`` of the two tiles' difference per pixel. Transitions are at least ``overlap`` wide whenever
``tile >= 2.5 * overlap`` (the overlap is never less than asked), so tiles that differ by a constant
``d`` produce no step above ``d / overlap``; ``TileLayout.min_transition`` gives the exact width for
smaller tiles. The raised-cosine ramp is smooth at both ends of the overlap but steeper in its middle
(at most ``pi/2 * d / L`` per pixel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Sequence

import torch

ALIGN = 16


class Ramp(str, Enum):
    LINEAR = "linear"   # feathered blending
    COSINE = "cosine"   # raised cosine: C1-smooth at the overlap's ends


@dataclass(frozen=True)
class Tile:
    """One tile in image coordinates (pixels, or latent cells for a scaled layout)."""
    index: int
    x: int
    y: int
    w: int
    h: int

    @property
    def rows(self) -> slice:
        return slice(self.y, self.y + self.h)

    @property
    def cols(self) -> slice:
        return slice(self.x, self.x + self.w)


@dataclass(frozen=True)
class Axis:
    """The tiles along one axis: equal ``size``, increasing ``starts``, the last ending at ``length``."""
    length: int
    size: int
    starts: tuple[int, ...]

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(s + self.size for s in self.starts)

    def transitions(self) -> list[tuple[int, int]]:
        """[a_i, b_i) where weight passes from tile i to tile i+1: the overlap [s_{i+1}, e_i) of the
        two. Where tile i+2 starts before tile i ends, transitions i and i+1 would overlap; they are
        cut at one point of [s_{i+2}, e_i), chosen to make the two equally wide, so consecutive
        transitions never overlap and every position has at most two tiles with a weight."""
        s, e, n = self.starts, self.ends, len(self.starts)
        cuts = []
        for i in range(n - 2):
            if s[i + 2] < e[i]:
                cuts.append(min(max((s[i + 1] + e[i + 1]) // 2, s[i + 2]), e[i]))
            else:
                cuts.append(None)
        out = []
        for i in range(n - 1):
            a, b = s[i + 1], e[i]
            if i >= 1 and cuts[i - 1] is not None:
                a = max(a, cuts[i - 1])
            if i + 2 < n and cuts[i] is not None:
                b = min(b, cuts[i])
            out.append((a, max(a, b)))
        return out

    def weights(self, ramp: Ramp) -> list[torch.Tensor]:
        """Per tile, a float64 weight vector of length ``size``; summed over the tiles covering a
        position they give exactly 1 (up to float64 rounding)."""
        trans = self.transitions()
        out = []
        for i, s in enumerate(self.starts):
            w = torch.zeros(self.length, dtype=torch.float64)
            lo = trans[i - 1][1] if i > 0 else 0
            hi = trans[i][0] if i < len(trans) else self.length
            w[lo:hi] = 1.0
            if i > 0:
                a, b = trans[i - 1]
                w[a:b] = _ramp(b - a, ramp)
            if i < len(trans):
                a, b = trans[i]
                w[a:b] = 1.0 - _ramp(b - a, ramp)
            out.append(w[s:s + self.size])
        return out

    def min_transition(self) -> int:
        widths = [b - a for a, b in self.transitions()]
        return min(widths) if widths else self.length

    def max_cover(self) -> int:
        """The largest number of tiles covering one position (2 when neighbours only)."""
        cover = torch.zeros(self.length, dtype=torch.int32)
        for s in self.starts:
            cover[s:s + self.size] += 1
        return int(cover.max())

    def scaled(self, factor: int) -> Axis:
        if self.length % factor or self.size % factor or any(s % factor for s in self.starts):
            raise ValueError(f"axis {self} is not divisible by {factor}")
        return Axis(self.length // factor, self.size // factor, tuple(s // factor for s in self.starts))


def _ramp(length: int, ramp: Ramp) -> torch.Tensor:
    """Weight of the incoming tile across a transition of ``length`` pixels: sampled at pixel centres,
    ``(k + 0.5) / length``, so it moves by exactly ``1/length`` per pixel inside the transition and
    by half that at its ends (two transitions that touch at a cut add up to at most ``1/length``)."""
    t = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    if ramp is Ramp.COSINE:
        return 0.5 - 0.5 * torch.cos(math.pi * t)
    return t


def axis(length: int, tile: int, overlap: int, align: int = ALIGN) -> Axis:
    """Equal tiles of at most ``tile`` covering ``length`` with neighbours overlapping >= ``overlap``.

    All arguments are multiples of ``align``; ``tile >= 2 * overlap``. Computed in units of ``align``:
    count = smallest n with n*tile - (n-1)*overlap >= length; size = smallest that still overlaps
    by ``overlap``; starts spread evenly (floor), so consecutive strides differ by at most one unit."""
    for name, v in (("length", length), ("tile", tile), ("overlap", overlap)):
        if v % align or v < 0:
            raise ValueError(f"{name}={v} must be a non-negative multiple of {align}")
    if length <= 0 or tile <= 0:
        raise ValueError(f"length={length} and tile={tile} must be positive")
    if tile < 2 * overlap:
        raise ValueError(f"tile={tile} must be at least twice overlap={overlap}")
    n, t, o = length // align, tile // align, overlap // align
    if n <= t:
        return Axis(length, length, (0,))
    gaps = -(-(n - t) // (t - o))               # count - 1
    size = -(-(n + gaps * o) // (gaps + 1))     # <= t, overlaps >= o
    starts = tuple((i * (n - size)) // gaps * align for i in range(gaps + 1))
    return Axis(length, size * align, starts)


class TileLayout:
    """Tiles covering a ``width x height`` image, row by row, with blend weights (see module doc)."""

    def __init__(self, width: int, height: int, tile: int, overlap: int, align: int = ALIGN) -> None:
        self.overlap = overlap
        self.x_axis = axis(width, tile, overlap, align)
        self.y_axis = axis(height, tile, overlap, align)

    @classmethod
    def _from_axes(cls, x_axis: Axis, y_axis: Axis, overlap: int) -> TileLayout:
        obj = cls.__new__(cls)
        obj.x_axis, obj.y_axis, obj.overlap = x_axis, y_axis, overlap
        return obj

    @property
    def width(self) -> int:
        return self.x_axis.length

    @property
    def height(self) -> int:
        return self.y_axis.length

    @property
    def tile_w(self) -> int:
        return self.x_axis.size

    @property
    def tile_h(self) -> int:
        return self.y_axis.size

    @property
    def tiles(self) -> list[Tile]:
        return [Tile(iy * len(self.x_axis.starts) + ix, x, y, self.tile_w, self.tile_h)
                for iy, y in enumerate(self.y_axis.starts) for ix, x in enumerate(self.x_axis.starts)]

    def __len__(self) -> int:
        return len(self.x_axis.starts) * len(self.y_axis.starts)

    def __repr__(self) -> str:
        return (f"TileLayout({self.width}x{self.height}: {len(self.x_axis.starts)}x{len(self.y_axis.starts)} "
                f"tiles of {self.tile_w}x{self.tile_h}, overlap >= {self.overlap})")

    def scaled(self, factor: int) -> TileLayout:
        """The same layout in a space ``factor`` times smaller (8: the VAE latent)."""
        return TileLayout._from_axes(self.x_axis.scaled(factor), self.y_axis.scaled(factor), self.overlap // factor)

    @property
    def min_transition(self) -> int:
        """Narrowest blend transition in pixels (>= overlap unless three tiles overlap somewhere)."""
        return min(self.x_axis.min_transition(), self.y_axis.min_transition())

    @property
    def pairwise(self) -> bool:
        """No position is covered by more than two tiles along either axis."""
        return self.x_axis.max_cover() <= 2 and self.y_axis.max_cover() <= 2

    def weight_fn(self, ramp: Ramp):
        """A function Tile -> float32 weight [h, w] (axis weights computed once)."""
        wx, wy = self.x_axis.weights(ramp), self.y_axis.weights(ramp)
        nx = len(self.x_axis.starts)

        def weight(tile: Tile) -> torch.Tensor:
            iy, ix = divmod(tile.index, nx)
            return (wy[iy][:, None] * wx[ix][None, :]).float()
        return weight

    def batches(self, size: int) -> Iterator[list[Tile]]:
        """The tiles in row-major groups of at most ``size`` (all tiles have the same shape)."""
        tiles = self.tiles
        size = max(1, int(size))
        for i in range(0, len(tiles), size):
            yield tiles[i:i + size]


# ---------------------------------------------------------------- blending helpers

def crop(x: torch.Tensor, tile: Tile, channels_last: bool) -> torch.Tensor:
    """``x[..., tile]`` of an IMAGE [B,H,W,C] (channels_last) or a latent [B,C,H,W]."""
    return x[:, tile.rows, tile.cols, :] if channels_last else x[:, :, tile.rows, tile.cols]


def accumulate(canvas: torch.Tensor, piece: torch.Tensor, tile: Tile, weight: torch.Tensor,
               channels_last: bool) -> None:
    """``canvas[tile] += weight * piece`` in place, on the canvas' device and dtype."""
    piece = piece.to(canvas.device, canvas.dtype)
    w = weight.to(canvas.device, canvas.dtype)
    if channels_last:
        canvas[:, tile.rows, tile.cols, :] += piece * w[None, :, :, None]
    else:
        canvas[:, :, tile.rows, tile.cols] += piece * w[None, None]


def blend(pieces: Sequence[torch.Tensor], layout: TileLayout, ramp: Ramp, channels_last: bool,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """All tiles' ``pieces`` (in ``layout.tiles`` order) blended into one canvas."""
    tiles = layout.tiles
    if len(pieces) != len(tiles):
        raise ValueError(f"{len(pieces)} pieces for {len(tiles)} tiles")
    first = pieces[0]
    if out is None:
        shape = ((first.shape[0], layout.height, layout.width, first.shape[-1]) if channels_last
                 else (first.shape[0], first.shape[1], layout.height, layout.width))
        out = torch.zeros(shape, dtype=torch.float32, device=first.device)
    weight = layout.weight_fn(ramp)
    for tile, piece in zip(tiles, pieces):
        accumulate(out, piece, tile, weight(tile), channels_last)
    return out
