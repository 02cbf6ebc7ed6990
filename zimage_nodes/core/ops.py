"""Small layers shared by the models, and the fp8 weight format.

fp8 weights (``CastLinear`` with an fp8 ``weight`` and an fp32 ``weight_scale``): the stored weight is
``weight / weight_scale`` in fp8, one scale per tensor (``quantize_fp8``: ``amax / finfo(fp8).max``, so the
largest entry lands on the format's largest value and small weights keep their relative precision instead of
flushing to fp8's subnormals or zero, as a plain cast does). Two ways to multiply:

- dequant (any device, the default): the weight is cast to the input's dtype per call and the scale applied
  to whichever side is smaller (the output for short inputs, the weight otherwise; the weight under
  torch.compile, where it fuses into the cast);
- fp8 matmul (``fp8_matmul = True`` on the layer; CUDA, e4m3 weight, both sizes multiples of 16, bf16/fp16
  input): the input is quantized to e4m3 with dynamic per-row (per-token) scales (``amax(|row|) / 448``,
  computed on the device: no host sync) and both operands go to ``torch._scaled_mm`` (fp32 scales applied in
  its epilogue, fast accumulation). Anything else takes the dequant path.

``weight_scale`` is a non-persistent buffer: it moves with ``.to()``, ComfyUI's model patcher and the block
streamer (they move ``named_buffers``), and it stays out of ``state_dict``, whose keys remain the checkpoint's
(tests and the shape checks compare them). A layer whose weight is not fp8 has ``weight_scale`` None.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
# Devices on which ``fp8_matmul`` layers use torch._scaled_mm. Tests add "cpu" (torch._scaled_mm runs there
# too for e4m3 with per-tensor scales) to exercise the fp8 math without a GPU.
FP8_MATMUL_DEVICES = frozenset({"cuda"})
# The DiT's transformer-block linears that get fp8 matmuls (attention qkv/out, SwiGLU w1/w2/w3 of the
# context refiner, noise refiner and main layers); embedders, adaLN and the final layer stay dequantized.
DIT_BLOCK_LINEARS = re.compile(
    r"(?:^|\.)(?:noise_refiner|context_refiner|layers)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123])$")
_QUANT_CHUNK = 1 << 24  # elements per chunk when quantizing (bounds the fp32 temporary to 64 MB)


class CastLinear(nn.Linear):
    """nn.Linear whose weight may be stored in another dtype (fp8 storage): cast per call to the input's,
    with an optional per-tensor fp32 ``weight_scale`` and optional fp8 matmuls (module docstring)."""

    fp8_matmul: bool = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None, persistent=False)

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # placeholders the loader replaces: drawing random values for them is wasted time
            return
        super().reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        w, b, s = self.weight, self.bias, self.weight_scale
        if s is not None and self.fp8_matmul and fp8_matmul_applies(x, w):
            return fp8_linear(x, w, s, b)
        cast = w.dtype != x.dtype
        if cast:
            w = w.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        if s is None:
            return F.linear(x, w, b)
        if torch.compiler.is_compiling():  # scale the weight: fuses into the cast
            return F.linear(x, w * s, b)
        if x.numel() // x.shape[-1] > w.shape[1]:  # eager, many rows: scale the weight (in place: the cast's copy)
            return F.linear(x, w.mul_(s) if cast else w * s, b)
        y = F.linear(x, w) * s  # scale the output: fewer elements than the weight
        return y if b is None else y + b

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", weight={str(self.weight.dtype).replace('torch.', '')}"
        if self.weight_scale is not None:
            text += ", per-tensor scale"
        return text + (", fp8 matmul" if self.fp8_matmul else "")


def cast_linears(module: nn.Module) -> int:
    """Let every plain nn.Linear of a library model (e.g. transformers' Qwen3) take weights stored in
    another dtype, by making it a CastLinear (same parameters, same math). Returns how many changed."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = CastLinear
            m.register_buffer("weight_scale", None, persistent=False)
            n += 1
    return n


# ---------------------------------------------------------------- fp8 weights

def fp8_scale(amax: Tensor, dtype: torch.dtype = E4M3) -> Tensor:
    """The per-tensor scale for a tensor whose largest magnitude is ``amax``: ``amax / finfo(dtype).max``
    rounded to the nearest bf16 value (exact in every compute dtype, so scaling the weight or the output,
    eager or compiled, gives the same numbers); 1 for an all-zero tensor. fp32, 0-dim, on amax's device."""
    s = amax.detach().float().reshape(()) / torch.finfo(dtype).max
    return torch.where(s > 0, s, torch.ones_like(s)).to(torch.bfloat16).float()


def quantize_fp8(w: Tensor, dtype: torch.dtype = E4M3) -> tuple[Tensor, Tensor]:
    """``(weight / scale).to(dtype), scale`` with the per-tensor ``fp8_scale``, on w's device, in chunks
    (no fp32 copy of the whole tensor) and without a host sync."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"not an fp8 dtype: {dtype}")
    w = w.detach()
    if w.dtype in FP8_DTYPES:  # requantizing another fp8 format: abs/amax need a float dtype
        w = w.float()
    flat = w.reshape(-1)
    if flat.numel() == 0:
        return torch.empty(w.shape, dtype=dtype, device=w.device), torch.ones((), device=w.device)
    amax = torch.stack([c.abs().amax().float() for c in flat.split(_QUANT_CHUNK)]).amax()
    scale = fp8_scale(amax, dtype)
    fmax = torch.finfo(dtype).max
    q = torch.empty(w.shape, dtype=dtype, device=w.device)
    for src, dst in zip(flat.split(_QUANT_CHUNK), q.view(-1).split(_QUANT_CHUNK)):
        dst.copy_((src.float() / scale).clamp_(-fmax, fmax))
    return q, scale


def dequantize(linear: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weight a (possibly fp8) linear computes with, in ``dtype``."""
    w = linear.weight.detach().to(torch.float32)
    s = getattr(linear, "weight_scale", None)
    return (w if s is None else w * s).to(dtype)


def set_weight_scale(linear: nn.Module, scale: Optional[Tensor]) -> None:
    """Attach (or clear, with None) the per-tensor scale of a CastLinear's fp8 weight, on the weight's device."""
    if scale is not None:
        scale = scale.detach().to(device=linear.weight.device, dtype=torch.float32).reshape(())
    linear.register_buffer("weight_scale", scale, persistent=False)


def quantize_linears_fp8(module: nn.Module, fp8_matmul: bool = False, dtype: torch.dtype = E4M3,
                         matmul_names: re.Pattern = DIT_BLOCK_LINEARS) -> int:
    """Convert a loaded model's linears to fp8 storage with per-tensor scales, in place, where they are
    (the loader's rule: every 2-D linear weight, both sizes > 1). Plain nn.Linear layers become CastLinear;
    fp8 weights without a scale (a plain fp8 load) get scale 1; weights already scaled are left alone.
    With ``fp8_matmul`` the linears whose names match ``matmul_names`` (the DiT's block linears) also get
    fp8 matmuls (``set_fp8_matmul``). Returns how many weights were quantized."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = CastLinear
            m.register_buffer("weight_scale", None, persistent=False)
        if not isinstance(m, CastLinear):
            continue
        w = m.weight
        if w is None or w.is_meta or w.dim() != 2 or min(w.shape) <= 1 or m.weight_scale is not None:
            continue
        if w.dtype in FP8_DTYPES:
            set_weight_scale(m, torch.ones((), device=w.device))
            continue
        q, s = quantize_fp8(w, dtype)
        m.weight = nn.Parameter(q, requires_grad=False)
        set_weight_scale(m, s)
        n += 1
    if fp8_matmul:
        set_fp8_matmul(module, True, matmul_names)
    return n


def set_fp8_matmul(module: nn.Module, on: bool = True, names: re.Pattern = DIT_BLOCK_LINEARS) -> int:
    """Turn fp8 matmuls on (or off) for the CastLinears whose qualified names match ``names`` and whose
    weights are scaled e4m3. Returns how many layers were set."""
    n = 0
    for name, m in module.named_modules():
        if isinstance(m, CastLinear) and names.search(name):
            use = bool(on) and m.weight.dtype == E4M3 and m.weight_scale is not None
            m.fp8_matmul = use
            n += use
    return n


def fp8_matmul_applies(x: Tensor, w: Tensor) -> bool:
    """Whether ``fp8_linear`` can run for this input and weight (else the dequant path runs)."""
    return (x.device.type in FP8_MATMUL_DEVICES and w.dtype == E4M3 and x.dtype in (torch.bfloat16, torch.float16)
            and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0 and x.numel() > 0)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
               fast_accum: bool = True) -> Tensor:
    """``x @ (weight * weight_scale).T + bias`` with both operands in e4m3 through ``torch._scaled_mm``.

    The activation scales are dynamic and per row (per token: ``amax(|row|) / 448``, at least 1e-12),
    computed on the device, so a row's reduction and its quantization fuse into one pass when compiled
    (on an H200 that was 3 ms per 1024x1024 DiT forward faster than one scale for the whole tensor, whose
    global reduction is a separate pass; bench/dit_speed_lab.py --fp8-lab); the weight's per-tensor scale
    is broadcast over its rows. The output is in x's dtype. No host syncs, so it compiles into the
    surrounding graph."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    scale = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)
    xq = (x2.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    w_scale = weight_scale.reshape(1, 1).expand(1, weight.shape[0]).contiguous()
    y = torch._scaled_mm(xq, weight.t(), scale_a=scale, scale_b=w_scale,
                         bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype,
                         use_fast_accum=fast_accum)
    return y.reshape(*lead, weight.shape[0])
