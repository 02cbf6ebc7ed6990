"""upscaler.refine on the CPU with stand-in models: exactness of the tiling machinery, MultiDiffusion
averaging, out-of-memory halving, progress, interruption and batching. No ComfyUI needed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zimage_nodes import upscaler as U
from zimage_nodes.core import sampling, schedule
from zimage_nodes.core import vae as V
from zimage_nodes.core.errors import InputError


class UnshuffleOps:
    """An exactly invertible, 8x8-block-local 'VAE' (pixel unshuffle: 192 latent channels) and no DiT:
    with denoise 0 the refine must give its input back, whatever the tiling."""

    def __init__(self) -> None:
        self.dit_calls = 0
        self.encoded: list[int] = []

    def encode(self, pixels):
        self.encoded.append(pixels.shape[0])
        return F.pixel_unshuffle(pixels.movedim(-1, 1), 8)

    def decode(self, raw):
        return F.pixel_shuffle(raw, 8).movedim(1, -1)

    def encode_canvas(self, image, tile, overlap):
        return self.encode(image)

    def decode_canvas(self, raw, tile, overlap):
        return self.decode(raw)

    def sample(self, *a):
        self.dit_calls += 1
        raise AssertionError("the sampler must not run at denoise 0")

    def velocity(self, *a):
        self.dit_calls += 1
        raise AssertionError("the DiT must not run at denoise 0")

    def recover(self):
        pass


class BlockOps:
    """A 16-channel 'VAE' that works on 8x8 blocks (mean colour in, flat colour out) and a 'DiT' whose
    velocity at a latent cell depends on that cell alone. Everything is position-local, so any
    correct tiling (noise crops included) must reproduce the untiled computation."""

    def __init__(self, oom_above: int | None = None) -> None:
        self.oom_above = oom_above
        self.tile_sizes: list[int] = []
        self.batches: list[int] = []

    @staticmethod
    def _encode(pixels):
        rgb = F.avg_pool2d(pixels.movedim(-1, 1), 8)
        return torch.cat([rgb, rgb.mean(1, keepdim=True).expand(-1, 13, -1, -1)], 1)

    def encode(self, pixels):
        self.batches.append(pixels.shape[0])
        return self._encode(pixels)

    def decode(self, raw):
        return F.interpolate(raw[:, :3], scale_factor=8, mode="nearest").movedim(1, -1)

    def encode_canvas(self, image, tile, overlap):
        return self._encode(image)

    def decode_canvas(self, raw, tile, overlap):
        return self.decode(raw)

    @staticmethod
    def v(x, sigma):
        return torch.tanh(x) * (1.0 + sigma) - 0.3 * x

    def _maybe_oom(self, x):
        side = max(x.shape[-2:]) * 8
        self.tile_sizes.append(side)
        if self.oom_above is not None and side > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def sample(self, x_init, noise, sigmas, on_step):
        self._maybe_oom(x_init)
        return sampling.sample(lambda x, s, cap: self.v(x, s[:, None, None, None]), noise, sigmas,
                               torch.zeros(1, 1, 1), x_init=x_init, callback=lambda st: on_step(st.index))

    def velocity(self, x, sigma):
        self._maybe_oom(x)
        return self.v(x, sigma)

    def recover(self):
        pass


def settings(**kw) -> U.Settings:
    base = dict(tile=256, overlap=64, denoise=0.5, steps=5, seed=0, blend=U.BlendMode.FEATHER, max_batch=1)
    base.update(kw)
    return U.Settings(**base)


def run(image, s, ops, noise=None, progress=None, interrupt=None):
    notes: list[str] = []
    if noise is None:
        noise = torch.randn(1, 16, image.shape[1] // 8, image.shape[2] // 8, generator=torch.Generator().manual_seed(1))
    out, layout = U.refine(image, s, ops, noise, progress or (lambda d, t, x0=None: None), interrupt or (lambda: None),
                           notes)
    return out, layout, notes


@pytest.mark.parametrize("blend", list(U.BlendMode))
@pytest.mark.parametrize("size,tile,overlap", [((384, 640), 256, 64), ((592, 800), 256, 112), ((256, 256), 1024, 128)])
def test_denoise_0_reproduces_the_upscaled_image_exactly(blend, size, tile, overlap):
    """Proves the cut/encode/decode/blend machinery adds nothing of its own: with an exactly invertible
    VAE stand-in and denoise 0 the output is the input to float32 rounding, for pairwise, three-way
    (592x800 tile 256/112) and single-tile layouts, in all three blend modes; and no DiT call is made."""
    image = torch.rand(1, *size, 3)
    ops = UnshuffleOps()
    out, layout, _ = run(image, settings(tile=tile, overlap=overlap, denoise=0.0, blend=blend), ops)
    assert out.shape == image.shape
    assert (out - image).abs().max() <= 2e-6
    assert ops.dit_calls == 0


@pytest.mark.parametrize("blend", list(U.BlendMode))
def test_tiled_refine_equals_the_untiled_sampler_for_a_position_local_model(blend):
    """With a VAE and a DiT that only look at their own 8x8 block, tiling must not change the result:
    this checks that every tile gets the noise of its own position (the crops of one seed's canvas)
    and, for `latent`, that averaging the tiles' velocities at every step is the untiled Euler step."""
    image = torch.rand(1, 384, 640, 3)
    noise = torch.randn(1, 16, 48, 80, generator=torch.Generator().manual_seed(3))
    ops = BlockOps()
    s = settings(blend=blend, denoise=0.6, steps=5)
    out, layout, _ = run(image, s, ops, noise=noise)
    assert len(layout) > 1
    sigmas = schedule.make_sigmas(U.SCHEDULE, s.steps, U.SHIFT, s.denoise)
    x0 = ops.sample(V.raw_to_model(ops._encode(image)), noise, sigmas, lambda i: None)
    expected = ops.decode(V.model_to_raw(x0))
    assert (out - expected).abs().max() <= 1e-5


def test_out_of_memory_halves_the_tile_and_gives_what_the_smaller_tile_gives():
    """An OutOfMemoryError from a tile (injected by the stand-in above 256 px) halves the tile and
    restarts; the result equals a run that asked for the smaller tile (noise does not depend on the
    layout), and the notes say what happened."""
    image = torch.rand(1, 1024, 1024, 3)
    ops = BlockOps(oom_above=256)
    out, layout, notes = run(image, settings(tile=1024, overlap=128), ops)
    assert (layout.tile_w, layout.tile_h) == (256, 256)
    assert [n for n in notes if "out of GPU memory" in n] == [
        "out of GPU memory with 1024 px tiles; retried with 512 px tiles",
        "out of GPU memory with 432 px tiles; retried with 256 px tiles"]   # 512 asked: 432 fit 1024
    direct, direct_layout, _ = run(image, settings(tile=256, overlap=128), BlockOps())
    assert direct_layout.tile_w == 256
    assert torch.equal(out, direct)


def test_out_of_memory_in_latent_mode_halves_too():
    image = torch.rand(1, 512, 512, 3)
    ops = BlockOps(oom_above=256)
    out, layout, notes = run(image, settings(tile=512, overlap=64, blend=U.BlendMode.LATENT), ops)
    assert layout.tile_w <= 256 and any("retried with 256 px" in n for n in notes)


def test_out_of_memory_below_256_px_raises_a_clear_error():
    image = torch.rand(1, 1024, 1024, 3)
    ops = BlockOps(oom_above=0)
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        run(image, settings(tile=1024, overlap=128), ops)
    err = info.value
    assert isinstance(err, U.TileOutOfMemoryError)
    msg = str(err)
    assert "even with 256 px tiles" in msg and "Fix:" in msg and "memory policy" in msg
    assert "CUDA out of memory" in msg   # the original error is quoted
    assert sorted(set(ops.tile_sizes), reverse=True) == [1024, 432, 256]


def test_progress_counts_tile_forwards_and_ends_at_the_total():
    image = torch.rand(1, 512, 512, 3)
    for blend in U.BlendMode:
        seen: list[tuple[int, int]] = []
        _, layout, _ = run(image, settings(blend=blend, steps=5, denoise=0.5), BlockOps(),
                           progress=lambda d, t, x0=None: seen.append((d, t)))
        forwards = len(schedule.make_sigmas(U.SCHEDULE, 5, U.SHIFT, 0.5)) - 1
        total = len(layout) * forwards
        assert {t for _, t in seen} == {total}
        values = [d for d, _ in seen]
        assert values == sorted(values) and values[0] == 0 and values[-1] == total
        assert len(set(values)) == total + 1   # one update per tile forward


def test_interrupt_is_checked_between_tiles():
    image = torch.rand(1, 512, 512, 3)
    ops = BlockOps()
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("interrupted")

    with pytest.raises(KeyboardInterrupt):
        run(image, settings(denoise=0.0), ops, interrupt=interrupt)
    assert len(ops.batches) == 3   # tiles 1-3 done, stopped before the 4th of 9


def test_tiles_go_through_in_batches_of_max_batch():
    image = torch.rand(1, 512, 512, 3)
    ops = BlockOps()
    out4, layout, _ = run(image, settings(max_batch=4), ops)
    assert len(layout) == 9 and ops.batches == [4, 4, 1]
    out1, _, _ = run(image, settings(max_batch=1), BlockOps())
    assert (out4 - out1).abs().max() <= 1e-5


def test_input_checks_name_the_input_the_expectation_and_the_fix():
    notes: list[str] = []
    cases = [
        (lambda: U.check_tiling(1024, 100, notes), "`overlap` = 100", "set overlap to 96 or 112"),
        (lambda: U.check_tiling(256, 192, notes), "`tile_size` = 256 is smaller than twice `overlap` = 192",
         "raise tile_size to at least 384"),
        (lambda: U.check_tiling(128, 32, notes), "`tile_size` = 128 is below 256", "Fix:"),
        (lambda: U.target_size(1024, 1024, 2.0, 9000, 0, notes), "`width` = 9000", "at most 8192"),
        (lambda: U.target_size(1024, 768, 9.0, 0, 0, notes), "`scale_by` = 9.0 asks for 9216x6912",
         "scale_by <= 8.00"),
        (lambda: U.check_image(torch.zeros(0, 64, 64, 3)), "`image` is empty", "Expected"),
        (lambda: U.check_image(torch.zeros(1, 1, 1, 3)), "`image` is only 1x1 pixels", "at least 8x8"),
        (lambda: U.check_image(torch.zeros(1, 64, 64, 1)), "`image` has 1 channel", "RGB"),
    ]
    for fn, what, fix in cases:
        with pytest.raises(InputError) as info:
            fn()
        msg = str(info.value)
        assert what in msg and fix in msg and "Expected:" in msg and "Fix:" in msg, msg
    assert U.check_tiling(1000, 128, notes) == (992, 128) and "snapped" in notes[-1]
    assert U.target_size(1000, 500, 2.0, 0, 0, []) == (2000, 1000)
    assert U.target_size(1000, 500, 2.0, 3000, 0, []) == (3000, 1500)
    assert U.target_size(1000, 500, 2.0, 0, 0, []) == (2000, 1000)


def test_lanczos_and_padding():
    image = torch.rand(2, 30, 50, 3)
    big = U.lanczos(image, 100, 60)
    assert big.shape == (2, 60, 100, 3) and 0 <= float(big.min()) and float(big.max()) <= 1
    padded = U.pad_to_grid(big)
    assert padded.shape == (2, 64, 112, 3)
    assert torch.equal(padded[:, :60, :100], big) and torch.equal(padded[:, 63, 111], big[:, 59, 99])
    assert torch.equal(U.lanczos(image, 50, 30), image)
