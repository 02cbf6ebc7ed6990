"""Attention backends for the DiT: PyTorch SDPA (always there) and, when installed, flash-attn,
xformers and SageAttention. Optional packages are imported on first use, never at module import."""
from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import InputError

BACKENDS: tuple[str, ...] = ("sdpa", "flash", "xformers", "sage")
_PACKAGES = {"flash": "flash_attn", "xformers": "xformers.ops", "sage": "sageattention"}
_HALF = (torch.float16, torch.bfloat16)
AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


@functools.cache
def _kernel(backend: str) -> AttnFn | None:
    """The backend's function on [B, heads, L, head_dim] tensors, or None when it cannot be imported."""
    if backend == "sdpa":
        return _sdpa
    try:
        mod = importlib.import_module(_PACKAGES[backend])
    except Exception:  # a missing package, or one built against another torch/CUDA
        return None
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
        return "sdpa", (f"attention backend {requested!r} is not available ({_PACKAGES[requested]} does not "
                        f"import); using PyTorch SDPA")
    return requested, None


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa", mask: Tensor | None = None) -> Tensor:
    """Non-causal attention; q, k, v and the result are [B, heads, L, head_dim].

    ``mask`` (bool, broadcastable to [B, heads, L, L], True = attend) always runs as SDPA. A backend
    that is missing, or that cannot take these tensors (flash/sage/xformers need CUDA, flash/sage
    need fp16/bf16), runs as SDPA."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    fn = _kernel(backend) if backend != "sdpa" and q.is_cuda else None
    if fn is None or (backend != "xformers" and q.dtype not in _HALF):
        return _sdpa(q, k, v)
    return fn(q, k, v)
