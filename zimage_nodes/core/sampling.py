"""The flow-matching Euler loop of Z-Image (text-to-image and image-to-image).

Conventions (docs/ARCHITECTURE.md): latents in model space, ``x_sigma = (1-sigma)*x0 + sigma*noise``,
the model returns ``v = noise - x0`` (ComfyUI's sign), Euler ``x += (sigma_next - sigma) * v``.
The loop itself makes no host synchronisation; the per-step callback decides whether to look at
the prediction (previews do, progress and interrupt checks do not).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import ZImageError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    index: int          # 0-based forward index
    total: int          # number of forwards
    sigma: float
    x0: torch.Tensor    # predicted clean latent (model space), on the model's device


StepCallback = Callable[[Step], None]


class NonFiniteError(ZImageError):
    """NaN or inf appeared in the latent."""


def _guided(model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
            uncond: Optional[torch.Tensor], cfg: float, max_batch: int) -> torch.Tensor:
    """One guided velocity. With cfg > 1 the negative runs batched with the positive when both
    captions have the same length (else as a second call)."""
    b = x.shape[0]
    if uncond is None or cfg == 1.0:
        return _chunked(model_fn, x, sigma, cond.expand(b, -1, -1), max_batch)
    if cond.shape[1] == uncond.shape[1]:
        caps = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1)])
        v = _chunked(model_fn, torch.cat([x, x]), torch.cat([sigma, sigma]), caps, max_batch)
        v_pos, v_neg = v[:b], v[b:]
    else:
        v_pos = _chunked(model_fn, x, sigma, cond.expand(b, -1, -1), max_batch)
        v_neg = _chunked(model_fn, x, sigma, uncond.expand(b, -1, -1), max_batch)
    return v_neg + cfg * (v_pos - v_neg)


def _chunked(model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, cap: torch.Tensor,
             max_batch: int) -> torch.Tensor:
    if max_batch <= 0 or x.shape[0] <= max_batch:
        return model_fn(x, sigma, cap).float()
    return torch.cat([model_fn(x[i:i + max_batch], sigma[i:i + max_batch], cap[i:i + max_batch]).float()
                      for i in range(0, x.shape[0], max_batch)])


def sample(model_fn: ModelFn, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor, *,
           uncond: Optional[torch.Tensor] = None, cfg: float = 1.0, x_init: Optional[torch.Tensor] = None,
           max_batch: int = 0, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the Euler loop and return the final latent (model space, float32).

    noise: [B,16,h,w] standard normal; x_init: model-space latent to start from (image-to-image),
    mixed with the noise at ``sigmas[0]``; cond/uncond: [1,L,C] caption features.
    """
    sig = sigmas.to(device=noise.device, dtype=torch.float32)
    x = noise.float()
    if x_init is not None:
        x = sig[0] * x + (1.0 - sig[0]) * x_init.to(x)
    n = len(sig) - 1
    b = x.shape[0]
    for i in range(n):
        s = sig[i].expand(b)
        v = _guided(model_fn, x, s, cond, uncond, cfg, max_batch)
        if callback is not None:
            callback(Step(i, n, float(sigmas[i]), x - sig[i] * v))
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def check_finite(x: torch.Tensor, context: str) -> None:
    """Raise NonFiniteError (one host sync, after the loop) when x holds NaN or inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(
            f"The sampler produced NaN/inf values ({bad} of {x.numel()} latent values) with {context}.",
            expected="finite latents",
            fix="run the DiT in bf16 or fp32 (not fp16), or pick a safer memory policy; "
                "if it persists the checkpoint may be damaged")
