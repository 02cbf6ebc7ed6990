"""Attention backends for the DiT: PyTorch SDPA (always there) and, when installed, flash-attn,
xformers, SageAttention and FlashAttention-3 (``fa3``: the official Hopper build's ``flash_attn_interface``,
or the forward-only ``fa3-fwd`` wheel's ``fa3_fwd_interface``). Optional packages are imported on first
use, never at module import.

fp8 attention (``fa3_fp8``, backend ``fa3`` on CUDA: ``fp8_attention_applies``) takes q, k and v already in
e4m3 with fp32 descales per (batch, head); FA3's fp8 forward applies them (its output is bf16). The caller
quantizes (``quantize_e4m3``): the DiT gives q and k static scales from their RMSNorm weights, fused into its
RoPE, and v dynamic ones (``head_scales``); see core/dit.py's ``Attention``."""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

BACKENDS: tuple[str, ...] = ("sdpa", "flash", "xformers", "sage", "fa3")
# backend -> the modules that provide it, tried in order
_PACKAGES = {"flash": ("flash_attn",), "xformers": ("xformers.ops",), "sage": ("sageattention",),
             "fa3": ("flash_attn_interface", "fa3_fwd_interface")}
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)
_HALF = (torch.float16, torch.bfloat16)
AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


# backend -> its module / kernel, or None when it does not import; filled on first resolution
# (set_attention_backend runs eagerly), so compiled blocks only read plain dicts and never trace an import.
_MODULES: dict[str, object] = {}
_KERNELS: dict[str, "AttnFn | None"] = {}


def _module(backend: str):
    """The first of the backend's modules that imports, or None."""
    if backend not in _MODULES:
        _MODULES[backend] = None
        for name in _PACKAGES[backend]:
            try:
                _MODULES[backend] = importlib.import_module(name)
                break
            except Exception:  # a missing package, or one built against another torch/CUDA
                continue
    return _MODULES[backend]


def _first(out):
    """FA3 returns ``out`` or ``(out, softmax_lse)`` depending on its version."""
    return out[0] if isinstance(out, tuple) else out


def forget_backends() -> None:
    """Forget which backends resolved (tests that hide a package)."""
    _KERNELS.clear()
    _MODULES.clear()


def _kernel(backend: str) -> AttnFn | None:
    """The backend's function on [B, heads, L, head_dim] tensors, or None when it cannot be imported."""
    if backend not in _KERNELS:
        _KERNELS[backend] = _resolve_kernel(backend)
    return _KERNELS[backend]


def _resolve_kernel(backend: str) -> AttnFn | None:
    if backend == "sdpa":
        return _sdpa
    mod = _module(backend)
    if mod is None:
        return None
    if backend == "fa3":
        return lambda q, k, v: _first(mod.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))).transpose(1, 2)
    if backend == "flash":
        return lambda q, k, v: mod.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if backend == "xformers":
        return lambda q, k, v: mod.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return lambda q, k, v: mod.sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def available_backends() -> list[str]:
    """The backends that import on this machine, "sdpa" first."""
    return [b for b in BACKENDS if _kernel(b) is not None]


def resolve_backend(requested: str) -> tuple[str, str | None]:
    """(backend to use, why it is not the requested one or None). Unknown names raise InputError."""
    if requested not in BACKENDS:
        raise InputError(f"Unknown attention backend {requested!r}.", found=requested,
                         expected=", ".join(BACKENDS), fix="Pick one of the listed backends.")
    if _kernel(requested) is None:
        return "sdpa", (f"attention backend {requested!r} is not available ({' / '.join(_PACKAGES[requested])} "
                        f"does not import); using PyTorch SDPA")
    return requested, None


def auto_backend(device: torch.device | str) -> str:
    """What ``auto`` means: FlashAttention-3 on a Hopper GPU (compute capability 9.x) when it imports, the
    fastest kernel measured there (on an H100 its bf16 kernel was 2% faster than the cuDNN kernel PyTorch SDPA
    picks, a 1024x1024 forward 92 against 93 ms); PyTorch SDPA everywhere else (FA3 is built for Hopper only)."""
    device = torch.device(device)
    if device.type != "cuda" or _kernel("fa3") is None:
        return "sdpa"
    return "fa3" if torch.cuda.get_device_capability(device)[0] == 9 else "sdpa"


# devices on which fp8 attention runs (FA3 is CUDA-only); tests add "cpu" to run the glue with a stand-in
FP8_ATTENTION_DEVICES = frozenset({"cuda"})


def head_scales(t: Tensor) -> Tensor:
    """fp32 scales [B, heads] for t [B, L, heads, head_dim]: ``amax / 448`` per (batch, head), at least 1e-12,
    so each head uses e4m3's whole range; computed on the device (no host sync)."""
    return (t.abs().amax(dim=(1, 3)).float() / E4M3_MAX).clamp_min(1e-12)


def quantize_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    """``t / scale`` in e4m3, clamped to its range (+-448); ``scale`` fp32, broadcastable to t. One pointwise
    pass, which torch.compile fuses into the op that produced t."""
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def fa3_fp8(q8: Tensor, k8: Tensor, v8: Tensor, q_descale: Tensor, k_descale: Tensor, v_descale: Tensor) -> Tensor:
    """FA3's fp8 forward: q8/k8/v8 e4m3 [B, L, heads, head_dim], descales fp32 [B, heads] (what multiplies
    each head back to its values); returns bf16 [B, L, heads, head_dim]."""
    return _first(_module("fa3").flash_attn_func(q8, k8, v8, q_descale=q_descale, k_descale=k_descale,
                                                 v_descale=v_descale))


def fp8_attention_available(backend: str) -> bool:
    """Whether fp8 attention can run for this backend (FA3 installed and a CUDA device present)."""
    device_present = torch.cuda.is_available() or bool(FP8_ATTENTION_DEVICES - {"cuda"})
    return backend == "fa3" and _kernel("fa3") is not None and device_present


def fp8_attention_applies(q: Tensor, backend: str, mask: Tensor | None = None) -> bool:
    """Whether ``fa3_fp8`` runs for these tensors: backend fa3 installed, no mask, q bf16/fp16 on a device
    that has it, head_dim a multiple of 16 (else the caller runs ``attention`` in q's dtype)."""
    return (mask is None and backend == "fa3" and q.device.type in FP8_ATTENTION_DEVICES and q.dtype in _HALF
            and q.shape[-1] % 16 == 0 and _kernel("fa3") is not None)


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa", mask: Tensor | None = None) -> Tensor:
    """Non-causal attention; q, k, v and the result are [B, heads, L, head_dim].

    ``mask`` (bool, broadcastable to [B, heads, L, L], True = attend) always runs as SDPA. A backend
    that is missing, or that cannot take these tensors (flash/sage/xformers/fa3 need CUDA, flash/sage/fa3
    need fp16/bf16), runs as SDPA."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fn = _kernel(backend) if backend != "sdpa" and q.is_cuda else None
    if fn is None or (backend != "xformers" and q.dtype not in _HALF):
        return _sdpa(q, k, v)
    return fn(q, k, v)
