"""The tiled upscaler behind ZImageTiledUpscale: pixel upscale, then a tiled img2img refine.

1. Pixel upscale to the target size: a core UPSCALE_MODEL (run as core's ImageUpscaleWithModel runs
   it, through the bridge), then Lanczos to the exact size; or Lanczos alone (Pillow, float32).
2. The working canvas is padded (edge replication) to multiples of 16 and cut by a
   ``core.tiling.TileLayout``. Every tile is refined at the DiT's resolution:
   - ``feather`` / ``cosine`` (pixel blending): per tile, VAE encode -> img2img -> VAE decode, and the
     decoded tiles are blended with weights that sum to 1 (linear or raised-cosine ramps). With
     denoise 0 the sampler is skipped: only the per-tile VAE round trip remains.
   - ``latent`` (MultiDiffusion): the canvas is VAE-encoded in tiles once; at every sampler step each
     tile's velocity is computed and the overlapping tiles are averaged (same weights) into one
     full-size velocity, so neighbours agree on the overlap at every step instead of only after
     decoding; then one tiled VAE decode.
3. The padding is cropped off.

Memory: only one tile batch (``policy.max_batch`` tiles) is on the GPU at a time; the full-size image,
noise and latent canvases live on ComfyUI's intermediate device (the CPU unless --gpu-only), and the
VAE only ever sees one tile, so peak VRAM does not grow with the output size. On
torch.cuda.OutOfMemoryError the tile is halved and the image restarted, down to 256 px.

Noise: one canvas for the whole image drawn like core's ``prepare_noise`` (seed + batch index), cropped
per tile. It is deterministic for a seed, the same under every tile layout, and overlapping tiles see
the same noise on their shared pixels (needed for the latent mode's averaging; it also keeps the pixel
modes' overlaps consistent).

The orchestration (``refine``) takes a ``TileOps`` object, so tests run it with stand-ins on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import comfy_bridge as bridge
from . import runtime
from .core import sampling, schedule
from .core import vae as vae_mod
from .core.errors import InputError, ZImageError
from .core.tiling import ALIGN, Ramp, TileLayout, accumulate, crop

MAX_SIDE = 8192          # largest output side
MIN_TILE = 256           # smallest tile_size, and the floor of the out-of-memory halving
MIN_INPUT_SIDE = 8       # smallest input image side
MIN_OUTPUT_SIDE = 64     # smallest output side
SCHEDULE, SHIFT = schedule.Schedule.TURBO, 3.0
DOWN = vae_mod.DOWNSCALE

ProgressFn = Callable[..., None]   # (done, total[, x0]) in tile-forwards; x0: a model-space latent to preview


class BlendMode(str, Enum):
    FEATHER = "feather"   # decoded tiles, linear ramps across each overlap
    COSINE = "cosine"     # decoded tiles, raised-cosine ramps
    LATENT = "latent"     # MultiDiffusion: tiles' velocities averaged at every step

    @property
    def ramp(self) -> Ramp:
        return Ramp.COSINE if self is BlendMode.COSINE else Ramp.LINEAR


class TileOutOfMemoryError(ZImageError, torch.cuda.OutOfMemoryError):
    """Out of GPU memory even with the smallest tile. Still an OutOfMemoryError, so ComfyUI shows its
    memory tips and unloads models as for any other OOM."""


@dataclass(frozen=True)
class Settings:
    tile: int
    overlap: int
    denoise: float
    steps: int
    seed: int
    blend: BlendMode
    max_batch: int = 1


class TileOps(Protocol):
    """What ``refine`` needs from the model (``ModelOps``; tests use stand-ins)."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE tiles [k,h,w,3] -> raw latents [k,16,h/8,w/8] (one VAE pass per tile size)."""

    def decode(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents [k,16,h,w] -> IMAGE [k,8h,8w,3]."""

    def sample(self, x_init: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
               on_step: Callable[..., None]) -> torch.Tensor:
        """img2img of a tile batch (model-space latents) -> model-space x0; ``on_step(i, x0)`` after
        every forward (x0 optional: the prediction, for previews)."""

    def velocity(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """One DiT forward over a tile batch (model space) -> v, float32."""

    def encode_canvas(self, image: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """The whole IMAGE [1,H,W,3] -> raw latent, the VAE running on one tile at a time."""

    def decode_canvas(self, raw: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
        """The whole raw latent -> IMAGE, the VAE running on one tile at a time."""

    def recover(self) -> None:
        """Release cached GPU memory after an out-of-memory error."""


# ---------------------------------------------------------------- input checks and sizes

def check_image(image) -> torch.Tensor:
    """IMAGE [B,H,W,C>=3] with at least one image of at least 8x8; returns its RGB part."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"`image` is not an IMAGE batch (found shape {shape}).",
                         expected="IMAGE [batch, height, width, 3]",
                         fix="connect an IMAGE output, e.g. Load Image or Z-Image Sampler's image")
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise InputError("`image` is empty.", found=f"shape {tuple(image.shape)}",
                         expected=f"at least one image of at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} pixels",
                         fix="check the node feeding `image` (an empty batch or a zero-size crop)")
    if h < MIN_INPUT_SIDE or w < MIN_INPUT_SIDE:
        raise InputError(f"`image` is only {w}x{h} pixels.", found=f"shape {tuple(image.shape)}",
                         expected=f"at least {MIN_INPUT_SIDE}x{MIN_INPUT_SIDE} pixels",
                         fix="upscale a real image; a few pixels hold nothing to refine")
    if c < 3:
        raise InputError(f"`image` has {c} channel(s).", found=f"shape {tuple(image.shape)}",
                         expected="3 (RGB) or 4 (RGBA, alpha is dropped) channels",
                         fix="convert the image to RGB first")
    return image[..., :3].float()


def check_tiling(tile_size: int, overlap: int, notes: list[str]) -> tuple[int, int]:
    """tile_size >= 256 (snapped down to a multiple of 16), overlap a multiple of 16, tile >= 2 x overlap."""
    if overlap < 0 or overlap % ALIGN:
        lo, hi = max(0, overlap // ALIGN * ALIGN), max(ALIGN, -(-overlap // ALIGN) * ALIGN)
        raise InputError(f"`overlap` = {overlap} is not a multiple of {ALIGN}.",
                         expected="0, 16, 32, ... (tiles start on the DiT's 16-pixel grid; default 128)",
                         fix=f"set overlap to {lo} or {hi}")
    if tile_size < MIN_TILE:
        raise InputError(f"`tile_size` = {tile_size} is below {MIN_TILE}.",
                         expected=f"{MIN_TILE} <= tile_size, a multiple of 16 (default 1024)",
                         fix=f"use at least {MIN_TILE}; to need less VRAM choose a memory policy instead "
                             "(the node also halves the tile by itself on out-of-memory)")
    tile = tile_size // ALIGN * ALIGN
    if tile != tile_size:
        notes.append(f"tile_size snapped from {tile_size} to {tile} (a multiple of 16)")
    if tile < 2 * overlap:
        raise InputError(f"`tile_size` = {tile_size} is smaller than twice `overlap` = {overlap}.",
                         expected="tile_size >= 2 x overlap (each tile needs a part no overlap covers)",
                         fix=f"raise tile_size to at least {2 * overlap}, or lower overlap to at most "
                             f"{tile // 2 // ALIGN * ALIGN}")
    return tile, overlap


def target_size(in_w: int, in_h: int, scale_by: float, width: int, height: int,
                notes: list[str]) -> tuple[int, int]:
    """Output size: width/height where given (one of them keeps the aspect ratio), else scale_by."""
    for name, v in (("width", width), ("height", height)):
        if v < 0 or v > MAX_SIDE:
            raise InputError(f"`{name}` = {v} is outside 0..{MAX_SIDE}.",
                             expected=f"0 (use scale_by) or up to {MAX_SIDE} pixels",
                             fix=f"set {name} to at most {MAX_SIDE}, or to 0 and use scale_by")
    if width and height:
        w, h, source = width, height, "`width`/`height`"
    elif width:
        w, h, source = width, round(in_h * width / in_w), "`width` (height keeps the aspect ratio)"
    elif height:
        w, h, source = round(in_w * height / in_h), height, "`height` (width keeps the aspect ratio)"
    else:
        if not scale_by > 0 or not math.isfinite(scale_by):
            raise InputError(f"`scale_by` = {scale_by}.", expected="a factor > 0 (e.g. 2.0)",
                             fix="set scale_by, or set width/height")
        w, h, source = round(in_w * scale_by), round(in_h * scale_by), f"`scale_by` = {scale_by}"
    if max(w, h) > MAX_SIDE:
        raise InputError(f"{source} asks for {w}x{h} from a {in_w}x{in_h} image.",
                         expected=f"at most {MAX_SIDE} pixels a side",
                         fix=f"lower it so that both sides stay <= {MAX_SIDE} "
                             f"(scale_by <= {MAX_SIDE / max(in_w, in_h):.2f} for this image)")
    if min(w, h) < MIN_OUTPUT_SIDE:
        raise InputError(f"{source} asks for {w}x{h} from a {in_w}x{in_h} image.",
                         expected=f"at least {MIN_OUTPUT_SIDE} pixels a side", fix="raise it")
    return w, h


# ---------------------------------------------------------------- pixel operations

def lanczos(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [B,H,W,C] -> [B,height,width,C] with Pillow's Lanczos filter in float32 (one "F" image
    per channel, in threads: Pillow releases the GIL while resampling), clamped to 0..1."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    src = image.detach().float().cpu()
    if (src.shape[2], src.shape[1]) == (width, height):
        return src.clone()

    def one(bc: tuple[int, int]) -> np.ndarray:
        pil = Image.fromarray(src[bc[0], :, :, bc[1]].contiguous().numpy())
        return np.array(pil.resize((width, height), Image.LANCZOS))

    jobs = [(b, c) for b in range(src.shape[0]) for c in range(src.shape[3])]
    with ThreadPoolExecutor(max_workers=min(len(jobs), 8)) as pool:
        planes = list(pool.map(one, jobs))   # numpy only in the threads (inference mode is per thread)
    out = torch.from_numpy(np.stack(planes).reshape(src.shape[0], src.shape[3], height, width))
    return out.permute(0, 2, 3, 1).contiguous().clamp_(0.0, 1.0)


def pad_to_grid(image: torch.Tensor) -> torch.Tensor:
    """Pad IMAGE [B,H,W,C] on the right/bottom by edge replication to multiples of 16."""
    h, w = image.shape[1:3]
    ph, pw = -h % ALIGN, -w % ALIGN
    if not (ph or pw):
        return image
    return F.pad(image.movedim(-1, 1), (0, pw, 0, ph), mode="replicate").movedim(1, -1)


# ---------------------------------------------------------------- the tiled refine

def refine(image: torch.Tensor, s: Settings, ops: TileOps, noise: torch.Tensor, progress: ProgressFn,
           check_interrupt: Callable[[], None], notes: list[str]) -> tuple[torch.Tensor, TileLayout]:
    """Refine one image [1,H,W,3] (H, W multiples of 16) tile by tile; ``noise`` is the model-space
    noise canvas [1,16,H/8,W/8]. Halves the tile on out-of-memory and starts again. Returns the image
    and the layout that was used."""
    sigmas = schedule.make_sigmas(SCHEDULE, s.steps, SHIFT, s.denoise)
    tile, overlap = s.tile, s.overlap
    while True:
        layout = TileLayout(image.shape[2], image.shape[1], tile, overlap)
        failed = None
        try:
            if s.blend is BlendMode.LATENT:
                out = _refine_latent(image, layout, sigmas, noise, ops, s.max_batch, progress, check_interrupt)
            else:
                out = _refine_pixels(image, layout, sigmas, noise, ops, s.blend.ramp, s.max_batch, progress,
                                     check_interrupt)
            return out, layout
        except torch.cuda.OutOfMemoryError as e:
            if isinstance(e, TileOutOfMemoryError):
                raise
            failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # outside the except block, so the failed attempt's tensors (held by the traceback) are freed
        used = max(layout.tile_w, layout.tile_h)   # may be below `tile`: tiles shrink to fit the image
        if used <= MIN_TILE:
            raise TileOutOfMemoryError(
                f"Out of GPU memory even with {used} px tiles (the tile was halved down to this size).",
                found=failed, expected=f"one tile of at least {MIN_TILE} px fitting in free VRAM next to the models",
                fix="free VRAM (close other GPU programs, unload other models), use a memory policy that "
                    "offloads the DiT (block_swap or sequential), or set policy max_batch to 1")
        smaller = max(MIN_TILE, used // 2 // ALIGN * ALIGN)
        notes.append(f"out of GPU memory with {used} px tiles; retried with {smaller} px tiles")
        bridge.warn(notes[-1])
        ops.recover()
        tile, overlap = smaller, min(overlap, smaller // 2 // ALIGN * ALIGN)


def _refine_pixels(image, layout: TileLayout, sigmas, noise, ops: TileOps, ramp: Ramp, max_batch: int,
                   progress: ProgressFn, check_interrupt) -> torch.Tensor:
    n = len(sigmas) - 1
    per_tile = max(n, 1)
    total, done = len(layout) * per_tile, 0
    weight = layout.weight_fn(ramp)
    lat_tiles = layout.scaled(DOWN).tiles
    canvas = torch.zeros_like(image)
    progress(0, total)
    for batch in layout.batches(max_batch):
        check_interrupt()
        raw = ops.encode(torch.cat([crop(image, t, True) for t in batch]))
        if n > 0:
            base = done

            def on_step(i: int, x0: Optional[torch.Tensor] = None, base=base, k=len(batch)) -> None:
                progress(base + (i + 1) * k, total, x0)
                check_interrupt()

            tile_noise = torch.cat([crop(noise, lat_tiles[t.index], False) for t in batch])
            x0 = ops.sample(vae_mod.raw_to_model(raw), tile_noise, sigmas, on_step)
            raw = vae_mod.model_to_raw(x0)
        out = ops.decode(raw)
        for j, t in enumerate(batch):
            accumulate(canvas, out[j:j + 1], t, weight(t), channels_last=True)
        done += len(batch) * per_tile
        progress(done, total)
    return canvas


def _refine_latent(image, layout: TileLayout, sigmas, noise, ops: TileOps, max_batch: int,
                   progress: ProgressFn, check_interrupt) -> torch.Tensor:
    vae_tile = max(layout.tile_w, layout.tile_h)
    vae_overlap = min(layout.overlap, vae_tile // 2 // DOWN * DOWN)   # the VAE tiler wants <= half a tile
    x = vae_mod.raw_to_model(ops.encode_canvas(image, vae_tile, vae_overlap))
    n = len(sigmas) - 1
    lat = layout.scaled(DOWN)
    weight = lat.weight_fn(Ramp.LINEAR)
    total, done = max(1, n * len(lat)), 0
    progress(0, total)
    if n > 0:
        s0 = float(sigmas[0])
        x = s0 * noise.to(x) + (1.0 - s0) * x
    for i in range(n):
        v_all = torch.zeros_like(x)
        for batch in lat.batches(max_batch):
            check_interrupt()
            v = ops.velocity(torch.cat([crop(x, t, False) for t in batch]), float(sigmas[i]))
            for j, t in enumerate(batch):
                accumulate(v_all, v[j:j + 1], t, weight(t), channels_last=False)
            done += len(batch)
            progress(done, total)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v_all
    sampling.check_finite(x, "the tiled upscale (latent blending)")
    out = ops.decode_canvas(vae_mod.model_to_raw(x), vae_tile, vae_overlap)
    progress(total, total)
    return out


# ---------------------------------------------------------------- the model behind TileOps

class ModelOps:
    """``TileOps`` on a loaded Z-Image model: VAE through runtime's functions, the DiT like runtime.sample."""

    def __init__(self, model: runtime.ZImageModel, positive: runtime.ZImageConditioning, max_batch: int) -> None:
        self.model = model
        self.device = model.dit_patcher.load_device
        self.compute = model.dit_dtypes[1]
        self.cond = positive.embeds.to(self.device, self.compute)
        self.max_batch = max_batch

    def encode(self, pixels):
        return runtime.encode_image(self.model, pixels)

    def decode(self, raw):
        return runtime.decode(self.model, raw)

    def _dit(self, x, s, cap):
        return self.model.dit(x, s, cap)

    def sample(self, x_init, noise, sigmas, on_step):
        bridge.load_on_device([self.model.dit_patcher])
        with torch.inference_mode():
            x0 = sampling.sample(self._dit, noise.to(self.device), sigmas, self.cond, x_init=x_init.to(self.device),
                                 max_batch=self.max_batch, callback=lambda st: on_step(st.index, st.x0))
            sampling.check_finite(x0, f"DiT compute dtype {str(self.compute).replace('torch.', '')}")
        return x0.to(bridge.intermediate_device(), torch.float32)

    def velocity(self, x, sigma):
        bridge.load_on_device([self.model.dit_patcher])
        with torch.inference_mode():
            x = x.to(self.device)
            s = torch.full((x.shape[0],), sigma, device=self.device, dtype=torch.float32)
            cap = self.cond.expand(x.shape[0], -1, -1)
            step = self.max_batch if self.max_batch > 0 else x.shape[0]
            v = torch.cat([self._dit(x[i:i + step], s[i:i + step], cap[i:i + step]).float()
                           for i in range(0, x.shape[0], step)])
        return v.to(bridge.intermediate_device(), torch.float32)

    def encode_canvas(self, image, tile, overlap):
        bridge.load_on_device([self.model.vae_patcher])
        with torch.inference_mode():
            return self.model.vae.encode_tiled(image, tile, overlap).float().to(bridge.intermediate_device())

    def decode_canvas(self, raw, tile, overlap):
        bridge.load_on_device([self.model.vae_patcher])
        with torch.inference_mode():
            return self.model.vae.decode_tiled(raw, tile, overlap).to(bridge.intermediate_device(), torch.float32)

    def recover(self):
        bridge.soft_empty_cache()


# ---------------------------------------------------------------- the node's function

def upscale(model: runtime.ZImageModel, image: torch.Tensor, positive: runtime.ZImageConditioning,
            scale_by: float, width: int, height: int, tile_size: int, overlap: int, denoise: float, steps: int,
            seed: int, blend: str, upscale_model=None, policy=None,
            ops: Optional[TileOps] = None) -> tuple[torch.Tensor, str]:
    """Upscale every image of the batch (image b uses seed + b); returns (IMAGE, report)."""
    notes: list[str] = []
    try:
        mode = BlendMode(blend)
    except ValueError:
        raise InputError(f"`blend` = {blend!r} is not a blend mode.",
                         expected=", ".join(m.value for m in BlendMode), fix="pick one from the list") from None
    tile, overlap = check_tiling(tile_size, overlap, notes)
    pixels = check_image(image)
    b, in_h, in_w = pixels.shape[:3]
    out_w, out_h = target_size(in_w, in_h, scale_by, width, height, notes)
    sigmas = schedule.make_sigmas(SCHEDULE, steps, SHIFT, denoise)   # checks steps and denoise up front
    runtime._check_conditioning(model, positive, "positive")
    max_batch = max(1, int(getattr(policy, "max_batch", 1) or 1))
    settings = Settings(tile, overlap, float(denoise), int(steps), int(seed), mode, max_batch)

    if upscale_model is not None:
        big = bridge.upscale_with_model(upscale_model, pixels)
        how = f"{type(getattr(upscale_model, 'model', upscale_model)).__name__} x{getattr(upscale_model, 'scale', '?')}"
        if (big.shape[2], big.shape[1]) != (out_w, out_h):
            how += f", then Lanczos {big.shape[2]}x{big.shape[1]} -> {out_w}x{out_h}"
            big = lanczos(big, out_w, out_h)
    else:
        big = lanczos(pixels, out_w, out_h)
        how = "Lanczos"
    big = pad_to_grid(big.to(bridge.intermediate_device()))
    ph, pw = big.shape[1:3]

    if ops is None:
        ops = ModelOps(model, positive, max_batch)
        previewer = bridge.live_previewer(ops.device)   # ComfyUI's preview method; None when off
    else:
        previewer = None
    bar = _BatchProgress(b, previewer)
    outputs = []
    for i in range(b):
        noise = bridge.prepare_noise((1, vae_mod.LATENT_CHANNELS, ph // DOWN, pw // DOWN), (seed + i) % 2 ** 64)
        noise = noise.to(bridge.intermediate_device())
        out, layout = refine(big[i:i + 1], settings, ops, noise, lambda d, t, x0=None, i=i: bar(i, d, t, x0),
                             bridge.check_interrupt, notes)
        outputs.append(out[:, :out_h, :out_w, :].clamp(0.0, 1.0))
        # the next images start from the tile that worked (the same layout unless a halving happened)
        settings = dataclasses.replace(settings, tile=max(layout.tile_w, layout.tile_h), overlap=layout.overlap)
    result = torch.cat(outputs).to(bridge.intermediate_device(), torch.float32)

    report = [f"{b} image(s) {in_w}x{in_h} -> {out_w}x{out_h} ({how})",
              f"{len(layout)} tiles of {layout.tile_w}x{layout.tile_h} "
              f"({len(layout.x_axis.starts)}x{len(layout.y_axis.starts)}), overlap >= {layout.overlap} px, "
              f"{mode.value} blending, {max_batch} tile(s) per batch",
              f"{len(sigmas) - 1} DiT forwards per tile (denoise {denoise}, steps {steps})"
              + ("; denoise 0: VAE round trip only" if len(sigmas) == 1 else "")]
    if (pw, ph) != (out_w, out_h):
        report.append(f"worked on {pw}x{ph} (edge-padded to multiples of 16), cropped back")
    text = "\n".join(report + notes)
    bridge.info(text.replace("\n", "; "))
    return result, text


class _BatchProgress:
    """One ComfyUI progress bar over all images of the batch (re-made when the total changes,
    e.g. after an out-of-memory halving), with a preview of the tile being refined when ComfyUI's
    preview method is on."""

    def __init__(self, images: int, previewer=None) -> None:
        self.images = images
        self.previewer = previewer
        self.bar = None
        self.total = 0

    def __call__(self, index: int, done: int, total: int, x0: Optional[torch.Tensor] = None) -> None:
        grand = total * self.images
        if self.bar is None or grand != self.total:
            self.bar, self.total = bridge.Progress(grand), grand
        preview = self.previewer(x0[:1]) if self.previewer is not None and x0 is not None else None
        self.bar.update(index * total + done, preview)
