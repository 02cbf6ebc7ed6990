"""The Flux VAE of Z-Image as a diffusers ``AutoencoderKL``: config and key map from a checkpoint
header (BFL ``ae.safetensors`` or diffusers layout), latent scaling, and (tiled) decode/encode.

Latents outside the DiT are in raw VAE space (what ``AutoencoderKL.decode`` takes); the DiT works
in model space, ``model = (raw - SHIFT) * SCALE``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from .errors import CheckpointError, InputError
from .st_io import Header, stream_tensors

SCALE = 0.3611
SHIFT = 0.1159
LATENT_CHANNELS = 16
DOWNSCALE = 8

Layout = Literal["bfl", "diffusers"]
_FIX_VAE = ("Load the Flux VAE: ae.safetensors from Comfy-Org/z_image_turbo (split_files/vae) into models/vae, "
            "or the vae/ folder of a diffusers Z-Image-Turbo download.")


def raw_to_model(z: torch.Tensor) -> torch.Tensor:
    """Raw VAE latent -> the DiT's latent space."""
    return (z - SHIFT) * SCALE


def model_to_raw(z: torch.Tensor) -> torch.Tensor:
    """The DiT's latent space -> raw VAE latent (what ``decode`` takes)."""
    return z / SCALE + SHIFT


def vae_layout(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> Layout:
    """``"bfl"`` (ae.safetensors: ``encoder.down.N.block.M``) or ``"diffusers"`` (``encoder.down_blocks``)."""
    if f"{prefix}encoder.down.0.block.0.conv1.weight" in shapes:
        return "bfl"
    if f"{prefix}encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
        return "diffusers"
    raise CheckpointError(
        "This file is not an autoencoder (VAE) in a layout this node reads.",
        found=f"{len(shapes)} tensors, e.g. {', '.join(list(shapes)[:3])}",
        expected=f"{prefix}encoder.down.0.block.0.conv1.weight (BFL ae.safetensors) or "
                 f"{prefix}encoder.down_blocks.0.resnets.0.conv1.weight (diffusers)",
        fix=_FIX_VAE)


def _indices(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.match(k))})


def vae_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` keyword arguments for the checkpoint (BFL or diffusers layout)."""
    layout = vae_layout(shapes, prefix)
    p = re.escape(prefix)
    if layout == "bfl":
        levels = _indices(shapes, p + r"encoder\.down\.(\d+)\.")
        first_conv = prefix + "encoder.down.{}.block.0.conv1.weight"
        per_block = _indices(shapes, p + r"encoder\.down\.0\.block\.(\d+)\.")
        attention = f"{prefix}encoder.mid.attn_1.q.weight"
    else:
        levels = _indices(shapes, p + r"encoder\.down_blocks\.(\d+)\.")
        first_conv = prefix + "encoder.down_blocks.{}.resnets.0.conv1.weight"
        per_block = _indices(shapes, p + r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
        attention = f"{prefix}encoder.mid_block.attentions.0.to_q.weight"
    needed = [first_conv.format(i) for i in levels] + [f"{prefix}{k}" for k in (
        "encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")]
    missing = [k for k in needed if k not in shapes]
    if missing:
        raise CheckpointError("The VAE file is incomplete.", found=f"missing {', '.join(missing[:3])}",
                              expected=f"a complete {layout}-layout autoencoder", fix=_FIX_VAE)
    latent = shapes[f"{prefix}decoder.conv_in.weight"][1]
    if latent != LATENT_CHANNELS:
        raise CheckpointError(
            "This VAE is not the 16-channel Flux VAE Z-Image uses.",
            found=f"a VAE with {latent} latent channels (SD/SDXL VAEs have 4, the Flux.2 VAE 32)",
            expected=f"{LATENT_CHANNELS} latent channels (ae.safetensors)", fix=_FIX_VAE)
    return {
        "in_channels": shapes[f"{prefix}encoder.conv_in.weight"][1],
        "out_channels": shapes[f"{prefix}decoder.conv_out.weight"][0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": [shapes[first_conv.format(i)][0] for i in levels],
        "layers_per_block": len(per_block),
        "act_fn": "silu",
        "latent_channels": latent,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": SCALE,
        "shift_factor": SHIFT,
        "force_upcast": True,
        "use_quant_conv": f"{prefix}quant_conv.weight" in shapes,
        "use_post_quant_conv": f"{prefix}post_quant_conv.weight" in shapes,
        "mid_block_add_attention": attention in shapes,
    }


def build_vae(config: Mapping[str, Any], device: torch.device | str = "meta",
              dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """An ``AutoencoderKL`` for ``config``, by default with meta placeholders for the weights."""
    with torch.device(device):
        model = AutoencoderKL(**config)
    return _cast(model, dtype).eval().requires_grad_(False)


def _cast(model: AutoencoderKL, dtype: torch.dtype) -> AutoencoderKL:
    # torch's Module.to: diffusers 0.42.1's ModelMixin.to logs a spurious "keep in float32"
    # warning on every dtype cast.
    return torch.nn.Module.to(model, dtype=dtype)


def _bfl_names(keys: list[str], prefix: str, config: Mapping[str, Any],
               shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """BFL file key -> diffusers name, by running diffusers' own converter over one-element
    tensors whose value is the index of their source key (the converter only renames keys and
    squeezes the 1x1-conv attention weights, so each output still carries its source index)."""
    tagged = {k[len(prefix):]: torch.full((1,) * len(shapes[k]), float(i), dtype=torch.float64)
              for i, k in enumerate(keys)}
    converted = convert_ldm_vae_checkpoint(tagged, dict(config))
    return {keys[int(v.item())]: name for name, v in converted.items()}


def _plan(shapes: Mapping[str, tuple[int, ...]], prefix: str, dtype: torch.dtype = torch.float32
          ) -> tuple[dict[str, Any], dict[str, str], dict[str, tuple[int, ...]], AutoencoderKL]:
    """(config, file key -> parameter name, parameter name -> shape, the model on the meta device in
    ``dtype``), checked for completeness."""
    config = vae_config_from_shapes(shapes, prefix)
    model = build_vae(config, dtype=dtype)
    targets = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    keys = [k for k in shapes if k.startswith(prefix)]
    if vae_layout(shapes, prefix) == "bfl":
        mapping = _bfl_names(keys, prefix, config, shapes)
    else:
        mapping = {k: k[len(prefix):] for k in keys}
    mapping = {k: n for k, n in mapping.items() if n in targets}
    missing = sorted(set(targets) - set(mapping.values()))
    wrong = [k for k, n in mapping.items()
             if torch.Size(shapes[k]).numel() != torch.Size(targets[n]).numel()]
    if missing or wrong:
        raise CheckpointError(
            "The VAE file does not match the Flux VAE structure its shapes suggest.",
            found="; ".join(filter(None, [
                f"no tensor for {', '.join(missing[:3])}" if missing else "",
                f"unexpected shape of {', '.join(wrong[:3])}" if wrong else ""])),
            expected="a complete, unmodified Flux autoencoder", fix=_FIX_VAE)
    return config, mapping, targets, model


def vae_key_map(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> dict[str, str]:
    """File key -> ``AutoencoderKL`` parameter name, computed from the header alone.

    Attention weights of the BFL layout are 1x1 convolutions ``[C, C, 1, 1]`` whose parameter is
    a ``Linear`` ``[C, C]``: reshape to the parameter's shape when copying (``convert_vae_state``
    does it). Tensors the model has no place for are left out."""
    return _plan(shapes, prefix)[1]


def convert_vae_state(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A checkpoint's tensors renamed and reshaped for ``AutoencoderKL.load_state_dict``.

    The VAE is small (84M parameters), so converting a whole state dict is acceptable."""
    _, mapping, targets, _ = _plan({k: tuple(v.shape) for k, v in tensors.items()}, prefix)
    return {n: tensors[k].reshape(targets[n]) for k, n in mapping.items()}


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(length: int, width: int, left: bool, right: bool) -> torch.Tensor:
    """1 in the middle, rising linearly over ``width`` samples on the sides that have a neighbour."""
    w = torch.ones(length)
    if width > 0:
        edge = torch.arange(1, width + 1, dtype=torch.float32) / (width + 1)
        if left:
            w[:width] = torch.minimum(w[:width], edge)
        if right:
            w[-width:] = torch.minimum(w[-width:], edge.flip(0))
    return w


def _tiled_apply(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int,
                 up: int, down: int) -> torch.Tensor:
    """``fn`` (whose output is ``up / down`` times its input's size) over ``tile``-sized tiles of
    ``x`` overlapping by ``overlap``, blended on the CPU with weights that ramp linearly across
    each overlap, so a tile's output fades in instead of starting with a seam."""
    ys, xs = _tile_starts(x.shape[2], tile, overlap), _tile_starts(x.shape[3], tile, overlap)
    ramp_width = overlap * up // down
    total = weight = None
    for iy, y in enumerate(ys):
        for ix, x0 in enumerate(xs):
            piece = fn(x[:, :, y:y + tile, x0:x0 + tile]).cpu()
            if total is None:
                size = (x.shape[2] * up // down, x.shape[3] * up // down)
                total = torch.zeros(piece.shape[0], piece.shape[1], *size)
                weight = torch.zeros(1, 1, *size)
            th, tw = piece.shape[-2:]
            oy, ox = y * up // down, x0 * up // down
            mask = (_ramp(th, ramp_width, iy > 0, iy < len(ys) - 1)[:, None]
                    * _ramp(tw, ramp_width, ix > 0, ix < len(xs) - 1)[None, :])
            total[:, :, oy:oy + th, ox:ox + tw] += piece * mask
            weight[:, :, oy:oy + th, ox:ox + tw] += mask
    return total / weight


def resolve_vae_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the VAE runs in: float32 or bfloat16; float16 becomes bfloat16 (the Flux
    VAE overflows in fp16 and decodes to NaN/black images)."""
    if dtype == torch.float16:
        return torch.bfloat16
    if dtype not in (torch.float32, torch.bfloat16):
        raise InputError("Unsupported VAE precision.", found=str(dtype), expected="float32 or bfloat16",
                         fix="Choose fp32 (default) or bf16.")
    return dtype


def load_vae(headers: Sequence[Header], prefix: str = "", device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32, progress: Callable[[int, int], None] | None = None) -> ZImageVAE:
    """Stream a VAE checkpoint (BFL ``ae.safetensors`` or diffusers ``vae/``) to ``device``.

    Every tensor is read once, renamed with ``vae_key_map``'s mapping and reshaped; ``progress``
    gets (tensors done, total)."""
    shapes = {k: v for h in headers for k, v in h.shapes().items()}
    run_dtype = resolve_vae_dtype(dtype)
    _, mapping, targets, model = _plan(shapes, prefix, run_dtype)  # the model is built once, on meta
    state: dict[str, torch.Tensor] = {}
    for header in headers:
        names = [k for k in header.tensors if k in mapping]
        for key, tensor in stream_tensors(header.path, names, device, lambda _name, _info: run_dtype):
            state[mapping[key]] = tensor.reshape(targets[mapping[key]])
            if progress is not None:
                progress(len(state), len(mapping))
    model.load_state_dict(state, strict=True, assign=True)
    return ZImageVAE(model, dtype)


class ZImageVAE:
    """A diffusers ``AutoencoderKL`` (Flux VAE) with ComfyUI's IMAGE conventions.

    ``dtype`` follows ``resolve_vae_dtype``; when float16 was asked for, ``notes`` says that
    bfloat16 is used instead (nodes can show it)."""

    def __init__(self, model: AutoencoderKL, dtype: torch.dtype = torch.float32) -> None:
        self.notes: list[str] = []
        self.dtype = resolve_vae_dtype(dtype)
        if dtype != self.dtype:
            self.notes.append("fp16 was requested for the VAE; using bf16 instead (the Flux VAE overflows in "
                              "fp16 and decodes to NaN/black images).")
        self.model = _cast(model, self.dtype).eval().requires_grad_(False)

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "",
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ZImageVAE:
        """Build from a checkpoint's tensors held in memory (BFL or diffusers layout) on ``device``."""
        config = vae_config_from_shapes({k: tuple(v.shape) for k, v in tensors.items()}, prefix)
        run_dtype = resolve_vae_dtype(dtype)
        model = build_vae(config, dtype=run_dtype)
        state = {n: t.to(device=device, dtype=run_dtype) for n, t in convert_vae_state(tensors, prefix).items()}
        model.load_state_dict(state, strict=True, assign=True)
        return cls(model, dtype)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- validation and conversions -------------------------------------------------------
    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != LATENT_CHANNELS:
            raise InputError("The latent is not a Z-Image/Flux latent.", found=f"shape {tuple(z.shape)}",
                             expected=f"[batch, {LATENT_CHANNELS}, height/8, width/8]",
                             fix="Connect a latent made for Z-Image (16 channels), e.g. from EmptySD3LatentImage.")

    @staticmethod
    def _pixels(image: torch.Tensor) -> torch.Tensor:
        """IMAGE [B,H,W,C] in 0..1 -> [B,3,H',W'] in -1..1, centre-cropped to multiples of 8 like ComfyUI."""
        if image.ndim != 4 or image.shape[-1] < 3 or min(image.shape[1:3]) < DOWNSCALE:
            raise InputError("The image cannot be encoded.", found=f"shape {tuple(image.shape)}",
                             expected="an IMAGE [batch, height>=8, width>=8, 3 or 4 channels]",
                             fix="Connect an IMAGE output (e.g. Load Image).")
        h, w = (s // DOWNSCALE * DOWNSCALE for s in image.shape[1:3])
        y, x = (image.shape[1] - h) // 2, (image.shape[2] - w) // 2
        return image[:, y:y + h, x:x + w, :3].movedim(-1, 1) * 2.0 - 1.0

    @staticmethod
    def _image(x: torch.Tensor) -> torch.Tensor:
        """Decoder output [B,3,H,W] in -1..1 -> IMAGE [B,H,W,3] float32 in 0..1 on the CPU."""
        return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.decode(z.to(self.device, self.dtype)).sample.float()

    def _encode_raw(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.encode(x.to(self.device, self.dtype)).latent_dist.mode().float()

    # -- public API -----------------------------------------------------------------------
    def decode(self, raw_latent: torch.Tensor) -> torch.Tensor:
        """Raw latent [B,16,h,w] -> IMAGE [B,8h,8w,3] float32 in 0..1 (CPU)."""
        self._check_latent(raw_latent)
        return self._image(self._decode_raw(raw_latent))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """IMAGE [B,H,W,3|4] in 0..1 -> raw latent [B,16,H/8,W/8] float32 (CPU): the posterior mean."""
        return self._encode_raw(self._pixels(image)).cpu()

    def decode_tiled(self, raw_latent: torch.Tensor, tile_px: int = 512, overlap_px: int = 64) -> torch.Tensor:
        """``decode`` in tiles of ``tile_px`` output pixels overlapping by ``overlap_px``, blended
        with linear ramps across each overlap (own tiler rather than diffusers' ``enable_tiling``,
        so that tile and overlap are exactly the requested pixel sizes for decode and encode alike)."""
        self._check_latent(raw_latent)
        self._check_tiles(tile_px, overlap_px)
        out = _tiled_apply(raw_latent, self._decode_raw, tile_px // DOWNSCALE, overlap_px // DOWNSCALE, DOWNSCALE, 1)
        return self._image(out)

    def encode_tiled(self, image: torch.Tensor, tile_px: int = 512, overlap_px: int = 64) -> torch.Tensor:
        """``encode`` in tiles of ``tile_px`` input pixels overlapping by ``overlap_px``, blended likewise."""
        self._check_tiles(tile_px, overlap_px)
        return _tiled_apply(self._pixels(image), self._encode_raw, tile_px, overlap_px, 1, DOWNSCALE)

    @staticmethod
    def _check_tiles(tile_px: int, overlap_px: int) -> None:
        if tile_px < 64 or tile_px % DOWNSCALE or overlap_px < 0 or overlap_px % DOWNSCALE or overlap_px > tile_px // 2:
            raise InputError("Invalid tile settings.", found=f"tile {tile_px} px, overlap {overlap_px} px",
                             expected="tile >= 64 and a multiple of 8; overlap a multiple of 8, at most half the tile",
                             fix="Use e.g. tile 512, overlap 64.")
