"""Lean Z-Image-Turbo DiT (single-stream, fused qkv) whose parameter names are the original file keys.

It reproduces ComfyUI's ``comfy/ldm/lumina/model.py`` NextDiT with the Z-Image config bit for bit when
both use PyTorch SDPA, and equals minus diffusers' ``ZImageTransformer2DModel`` at t = 1 - sigma up to
rounding. Differences from diffusers (all small, see tests/unit/test_dit.py):
- q/k RMSNorm eps: ComfyUI creates these norms without eps, so torch uses finfo(dtype).eps
  (1.2e-7 in fp32, 7.8e-3 in bf16); diffusers and the official code use 1e-5. ``DiTConfig.qk_norm_eps``
  picks (None = ComfyUI).
- Caption/image padding: all three pad the embedded caption and image tokens to a multiple of 32 with
  ``cap_pad_token`` / ``x_pad_token`` at the same RoPE positions and, for one caption length per batch,
  none of them masks the pad tokens in attention, so the outputs agree. diffusers masks only when the
  captions of one batch have different lengths, which this API (cap_feats [B, L, C]) cannot express.
- Token order: ComfyUI and this module run [caption, image]; diffusers runs [image, caption]. Without a
  mask attention does not depend on the order, so only float summation order differs.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (E4M3_MAX, attention, fa3_fp8, fp8_attention_applies, fp8_attention_available, head_scales,
                        quantize_e4m3, resolve_backend)
from .ops import CastLinear as Linear
from .errors import CheckpointError

T_FREQ_DIM = 256  # sinusoidal timestep features fed to t_embedder.mlp.0
# Unused by the forward; diffusers folders lack it (a loader fills it, e.g. with ones).
OPTIONAL_KEYS = frozenset({"norm_final.weight"})


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a Z-Image DiT; defaults are Z-Image-Turbo's (see dit_config_from_shapes)."""

    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    ffn_hidden: int
    cap_feat_dim: int
    in_channels: int = 16
    patch_size: int = 2
    t_hidden: int = 1024
    adaln_dim: int = 256
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)  # RoPE table sizes of the reference code; positions are
    # computed here (like ComfyUI), so these only document the trained range
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    norm_eps: float = 1e-5
    pad_multiple: int = 32
    qk_norm_eps: float | None = None  # None: torch's finfo(dtype).eps, as ComfyUI; 1e-5: official/diffusers

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def _shape_error(what: str, found: str, expected: str) -> CheckpointError:
    return CheckpointError(what, found=found, expected=expected,
                           fix="Load a Z-Image(-Turbo) diffusion model file (e.g. z_image_turbo_bf16.safetensors) "
                               "in this slot; the file may be truncated or a different model.")


def dit_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> DiTConfig:
    """Infer the DiT config from the tensor shapes of a file in the original key layout and check that
    every tensor the model needs is there with the right shape (extra keys are ignored, OPTIONAL_KEYS
    may be missing)."""
    return meta_dit_from_shapes(shapes, prefix).cfg


def meta_dit_from_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str = "",
                         dtype: torch.dtype | None = None) -> "ZImageDiT":
    """The ZImageDiT (on the meta device, parameters in ``dtype``) that a file with these tensor shapes
    describes, after the checks of ``dit_config_from_shapes``. The loader streams the file into it, so
    the model is built once (the full-size one: ~20 ms on a 2-core CPU, bench/meta_build_time.py)."""
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        if prefix + key not in shapes:
            raise _shape_error(f"The diffusion model file has no tensor '{prefix}{key}'.",
                               f"{len(shapes)} tensors, e.g. {sorted(shapes)[:3]}",
                               "the Z-Image DiT layout (x_embedder, layers.N.attention.qkv, cap_pad_token, ...)")
        if len(found := tuple(shapes[prefix + key])) != ndim:
            raise _shape_error(f"Tensor '{prefix}{key}' has the wrong rank.", str(found), f"{ndim} dimensions")
        return found

    def count(group: str) -> int:
        pat = re.compile(re.escape(prefix + group) + r"\.(\d+)\.")
        return len({m.group(1) for k in shapes if (m := pat.match(k))})

    dim, patch_in = shape("x_embedder.weight", 2)
    patch_size = math.isqrt(patch_in // 16)
    if patch_size * patch_size * 16 != patch_in:
        raise _shape_error("x_embedder does not take 16-channel square patches.", f"in-features {patch_in}",
                           "16 * patch_size**2 (64 for 2x2 patches)")
    head_dim = shape("layers.0.attention.q_norm.weight", 1)[0]
    axes_dims = DiTConfig.axes_dims
    if dim % head_dim or head_dim != sum(axes_dims):
        raise _shape_error("The attention head size does not fit the Z-Image RoPE.",
                           f"head_dim {head_dim} with model dim {dim}",
                           f"head_dim {sum(axes_dims)} (RoPE axes {axes_dims}) dividing the model dim")
    cfg = DiTConfig(dim=dim, n_layers=count("layers"), n_refiner_layers=count("noise_refiner"),
                    n_heads=dim // head_dim, ffn_hidden=shape("layers.0.feed_forward.w1.weight", 2)[0],
                    cap_feat_dim=shape("cap_embedder.1.weight", 2)[1], patch_size=patch_size,
                    t_hidden=shape("t_embedder.mlp.0.weight", 2)[0],
                    adaln_dim=shape("layers.0.adaLN_modulation.0.weight", 2)[1])
    with torch.device("meta"):
        model = ZImageDiT(cfg, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [f"{k}: {shapes[prefix + k] if prefix + k in shapes else 'missing'} (expected {v})"
           for k, v in expected.items()
           if tuple(shapes.get(prefix + k, ())) != v and not (k in OPTIONAL_KEYS and prefix + k not in shapes)]
    if (n_ctx := count("context_refiner")) != cfg.n_refiner_layers:
        bad.append(f"{n_ctx} context_refiner blocks")
    if bad:
        raise _shape_error(f"The diffusion model file does not match the Z-Image DiT it describes "
                           f"({len(bad)} tensors).", "; ".join(bad[:5]),
                           f"dim {dim}, {cfg.n_layers} layers, {cfg.n_refiner_layers} refiner layers, "
                           f"context_refiner as deep as noise_refiner")
    return model


def timestep_embedding(t: Tensor, dim: int = T_FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos | sin] of t [B] in float32, as ComfyUI and diffusers compute them."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_table(pos: Tensor, axes_dims: tuple[int, ...], theta: float) -> Tensor:
    """Rotation matrices [L, 1, head_dim // 2, 2, 2] (float32) for integer positions pos [L, n_axes],
    computed in float64 and laid out like ComfyUI's EmbedND output."""
    angles = []
    for i, d in enumerate(axes_dims):
        omega = 1.0 / theta ** torch.linspace(0, (d - 2) / d, d // 2, dtype=torch.float64)
        angles.append(pos[:, i, None].double() * omega)
    a = torch.cat(angles, dim=-1)[:, None]
    cos, sin = a.cos(), a.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).float()


def apply_rope(x: Tensor, freqs: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rotate interleaved pairs of x [B, L, heads, head_dim] in float32 (ComfyUI's op sequence: one
    product, one addcmul, so results match it bit for bit); result in ``dtype`` (default x's)."""
    x_ = x.unflatten(-1, (-1, 1, 2))
    out = freqs[..., 0] * x_[..., 0]
    return out.addcmul_(freqs[..., 1], x_[..., 1]).flatten(-2).to(x.dtype if dtype is None else dtype)


def rope_fp8_scale(norm: nn.RMSNorm) -> Tensor:
    """A static e4m3 scale for RoPE(norm(x)), whatever x: RMSNorm makes every head vector's squared sum
    head_dim * mean(w_i^2 x_i^2) / mean(x^2) <= head_dim * max(w^2) (eps only shrinks it), and RoPE rotates
    pairs, so no component exceeds sqrt(head_dim) * max|w|; that bound maps to 448. fp8 keeps its relative
    precision for anything down to 1/28672 of the bound, so nothing is lost against a per-head amax, and no
    reduction over the sequence is needed: the quantization fuses into the norm/RoPE pass. fp32, 0-dim."""
    w_max = norm.weight.detach().abs().amax().float()
    return (w_max * math.sqrt(norm.normalized_shape[-1]) / E4M3_MAX).clamp_min(1e-12)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm, without filling meta placeholders with ones (the loader replaces them; ~1000 of them
    in the full DiT made that a third of its build time)."""

    def reset_parameters(self) -> None:
        if self.weight is not None and self.weight.is_meta:
            return
        super().reset_parameters()


class Attention(nn.Module):
    """Fused-qkv self-attention with q/k RMSNorm and RoPE; ``backend`` names an attention.py backend."""

    def __init__(self, cfg: DiTConfig, **f: Any) -> None:
        super().__init__()
        self.n_heads, self.backend, self.fp8 = cfg.n_heads, "sdpa", False
        self.qkv = Linear(cfg.dim, 3 * cfg.dim, bias=False, **f)
        self.out = Linear(cfg.dim, cfg.dim, bias=False, **f)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.qk_norm_eps, **f)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.qk_norm_eps, **f)

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor | None = None) -> Tensor:
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, -1).unbind(2)
        if self.fp8 and fp8_attention_applies(q, self.backend, mask):
            return self.out(self._fp8_attention(q, k, v, freqs).reshape(B, L, -1))
        q, k = apply_rope(self.q_norm(q), freqs), apply_rope(self.k_norm(k), freqs)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.backend, mask)
        return self.out(o.transpose(1, 2).reshape(B, L, -1))

    def _fp8_attention(self, q: Tensor, k: Tensor, v: Tensor, freqs: Tensor) -> Tensor:
        """FA3's fp8 forward on [B, L, heads, head_dim] q/k/v straight from the qkv matmul: q and k leave the
        norm/RoPE pass in e4m3 with their static scales (``rope_fp8_scale``), v with one scale per
        (batch, head). Result bf16 [B, L, heads, head_dim]."""
        B, H = q.shape[0], q.shape[2]
        sq, sk = rope_fp8_scale(self.q_norm), rope_fp8_scale(self.k_norm)
        q8 = quantize_e4m3(apply_rope(self.q_norm(q), freqs, torch.float32), sq)
        k8 = quantize_e4m3(apply_rope(self.k_norm(k), freqs, torch.float32), sk)
        sv = head_scales(v)
        v8 = quantize_e4m3(v, sv[:, None, :, None])
        return fa3_fp8(q8, k8, v8, sq.expand(B, H).contiguous(), sk.expand(B, H).contiguous(), sv).to(q.dtype)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: DiTConfig, **f: Any) -> None:
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.ffn_hidden, bias=False, **f)
        self.w2 = Linear(cfg.ffn_hidden, cfg.dim, bias=False, **f)
        self.w3 = Linear(cfg.dim, cfg.ffn_hidden, bias=False, **f)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre/post-RMSNorm attention + SwiGLU block; modulated by the timestep unless a context refiner."""

    def __init__(self, cfg: DiTConfig, modulation: bool, **f: Any) -> None:
        super().__init__()
        self.attention = Attention(cfg, **f)
        self.feed_forward = FeedForward(cfg, **f)
        self.attention_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps, **f)
        self.attention_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps, **f)
        self.ffn_norm1 = RMSNorm(cfg.dim, eps=cfg.norm_eps, **f)
        self.ffn_norm2 = RMSNorm(cfg.dim, eps=cfg.norm_eps, **f)
        if modulation:
            self.adaLN_modulation = nn.Sequential(Linear(cfg.adaln_dim, 4 * cfg.dim, **f))

    def forward(self, x: Tensor, freqs: Tensor, adaln: Tensor | None, mask: Tensor | None = None) -> Tensor:
        if adaln is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln)[:, None].chunk(4, dim=-1)
        x = x + gate_msa.tanh() * self.attention_norm2(
            self.attention(self.attention_norm1(x) * (1 + scale_msa), freqs, mask))
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class ZImageDiT(nn.Module):
    """forward(x [B,16,H,W] model space, sigma [B], cap_feats [B,L,C]) -> v = noise - x0 (ComfyUI sign).

    Inputs are cast to the compute dtype, that of x_pad_token (matmul weights must be in it too, or be
    cast to it per block, e.g. from block_hook); sigma is used in float32; the result has x's dtype.
    ``cap_bucket`` (None: pad the caption to a multiple of 32 like ComfyUI) pads it further, to a multiple
    of cap_bucket (itself a multiple of 32), so that torch.compile sees fewer shapes (core/compile.py).
    The extra pad tokens are masked out of attention and the RoPE positions stay those of the
    32-padded caption, so the result equals the unbucketed one up to float rounding (attention then
    runs as masked SDPA). ``block_hook(i, block)``, if set, runs before main block i."""

    def __init__(self, cfg: DiTConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.cfg = cfg
        self.cap_bucket: int | None = None
        self.block_hook: Callable[[int, nn.Module], None] | None = None
        self._rope_cache: dict[tuple, Tensor] = {}
        p, d = cfg.patch_size, cfg.dim
        self.x_pad_token = nn.Parameter(torch.empty(1, d, **f))
        self.cap_pad_token = nn.Parameter(torch.empty(1, d, **f))
        self.x_embedder = Linear(p * p * cfg.in_channels, d, **f)
        self.t_embedder = nn.ModuleDict({"mlp": nn.Sequential(
            Linear(T_FREQ_DIM, cfg.t_hidden, **f), nn.SiLU(), Linear(cfg.t_hidden, cfg.adaln_dim, **f))})
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, **f),
                                          Linear(cfg.cap_feat_dim, d, **f))
        self.noise_refiner = nn.ModuleList(Block(cfg, True, **f) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(Block(cfg, False, **f) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(Block(cfg, True, **f) for _ in range(cfg.n_layers))
        self.norm_final = nn.RMSNorm(d, eps=cfg.norm_eps, **f)  # in the files, unused by the forward
        self.final_layer = nn.ModuleDict({
            "linear": Linear(d, p * p * cfg.in_channels, **f),
            "adaLN_modulation": nn.Sequential(nn.SiLU(), Linear(cfg.adaln_dim, d, **f))})

    def set_attention_backend(self, requested: str) -> str | None:
        """Use this backend in every block; returns why another one is used instead, or None."""
        backend, reason = resolve_backend(requested)
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
        return reason

    def set_fp8_attention(self, on: bool) -> bool:
        """fp8 attention in every block (FA3's fp8 forward, ``Attention._fp8_attention``) when ``on`` and the
        blocks' backend can run it; returns whether it is in effect. Not used by the nodes yet: with dynamic
        per-head scales for q, k and v it made a 1024x1024 fp8 forward slower on an H100 (69 vs 66 ms: the
        three amax passes cost more than the fp8 kernel saved); q and k now take static scales fused into
        RoPE (unmeasured). bench/bench_pipeline.py's ours_fp8_fa3 peer and graph_check.py --fp8-attention
        measure it."""
        blocks = [m for m in self.modules() if isinstance(m, Attention)]
        use = bool(on) and all(fp8_attention_available(m.backend) for m in blocks)
        for m in blocks:
            m.fp8 = use
        return use

    def _rope(self, cap_len: int, h: int, w: int, device: torch.device, cap_valid: int | None = None) -> Tensor:
        """Rotations for [caption (pos i+1, 0, 0), image (cap_valid+1, row, col), image pad (0, 0, 0)],
        cached per shape. ``cap_valid`` (default cap_len): the caption length without bucket padding."""
        cap_valid = cap_len if cap_valid is None else cap_valid
        key = (cap_len, h, w, device) if cap_valid == cap_len else (cap_len, h, w, device, cap_valid)
        if key not in self._rope_cache:
            n_img = h * w
            pos = torch.zeros(cap_len + n_img + (-n_img) % self.cfg.pad_multiple, 3)
            pos[:cap_len, 0] = torch.arange(1, cap_len + 1)
            img = pos[cap_len:cap_len + n_img]
            img[:, 0] = cap_valid + 1
            img[:, 1] = torch.arange(h).repeat_interleave(w)
            img[:, 2] = torch.arange(w).repeat(h)
            if len(self._rope_cache) >= 8:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_table(pos, self.cfg.axes_dims, self.cfg.rope_theta).to(device)
        return self._rope_cache[key]

    def forward(self, x: Tensor, sigma: Tensor, cap_feats: Tensor) -> Tensor:
        cfg, p = self.cfg, self.cfg.patch_size
        out_dtype, dtype = x.dtype, self.x_pad_token.dtype
        B, C, H, W = x.shape
        x = x.to(dtype)
        if H % p or W % p:  # like ComfyUI's pad_to_patch_size
            x = F.pad(x, (0, (-W) % p, 0, (-H) % p), mode="circular")
        h, w = x.shape[2] // p, x.shape[3] // p
        t = timestep_embedding((1.0 - sigma.to(x.device, torch.float32).expand(B)) * cfg.t_scale).to(dtype)
        adaln = self.t_embedder.mlp(t)

        cap = self.cap_embedder(cap_feats.to(dtype))
        n_valid = cap.shape[1] + (-cap.shape[1]) % cfg.pad_multiple  # ComfyUI's padded caption
        n_cap = n_valid + (-n_valid) % (self.cap_bucket or cfg.pad_multiple)
        cap = torch.cat([cap, self.cap_pad_token.to(dtype).expand(B, n_cap - cap.shape[1], -1)], dim=1)
        img = self.x_embedder(x.view(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, -1))
        img = torch.cat([img, self.x_pad_token.to(dtype).expand(B, (-h * w) % cfg.pad_multiple, -1)], dim=1)

        freqs = self._rope(n_cap, h, w, x.device, n_valid)
        cap_mask = z_mask = None
        if self.cap_bucket:  # hide the bucket padding (always a mask, so compiled graphs see one signature)
            keep = torch.arange(n_cap + img.shape[1], device=x.device)
            keep = (keep < n_valid) | (keep >= n_cap)
            cap_mask, z_mask = keep[:n_cap].view(1, 1, 1, -1), keep.view(1, 1, 1, -1)
        for block in self.context_refiner:
            cap = block(cap, freqs[:n_cap], None, cap_mask)
        for block in self.noise_refiner:
            img = block(img, freqs[n_cap:], adaln)
        z = torch.cat([cap, img], dim=1)
        for i, block in enumerate(self.layers):
            if self.block_hook is not None:
                self.block_hook(i, block)
            z = block(z, freqs, adaln, z_mask)

        scale = 1 + self.final_layer.adaLN_modulation(adaln)[:, None]
        z = self.final_layer.linear(F.layer_norm(z, (cfg.dim,), eps=1e-6) * scale)[:, n_cap:n_cap + h * w]
        v = z.view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)
        return -v[:, :, :H, :W].to(out_dtype)
