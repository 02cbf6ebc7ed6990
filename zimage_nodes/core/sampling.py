"""The flow-matching Euler loop of Z-Image (text-to-image and image-to-image).

Conventions (docs/ARCHITECTURE.md): latents in model space, ``x_sigma = (1-sigma)*x0 + sigma*noise``,
the model returns ``v = noise - x0`` (ComfyUI's sign), Euler ``x += (sigma_next - sigma) * v``.
Classifier-free guidance is ComfyUI's ``v = v_neg + cfg * (v_pos - v_neg)`` (diffusers' ZImagePipeline
writes the same as ``pos + g * (pos - neg)``, i.e. ``cfg = 1 + guidance_scale``).

The loop makes no host synchronisation: sigmas stay on the CPU for the callback and are indexed on
the device for the arithmetic, nothing reads a device value back. The per-step callback decides
whether to look at the prediction: ``Step.x0`` is computed only when read (previews do, progress and
interrupt checks do not). tests/unit/test_sampling.py runs the loop on the meta device to prove it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import ZImageError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """What the callback sees after the model ran at ``sigma`` (before the Euler update)."""
    index: int          # 0-based forward index
    total: int          # number of forwards
    sigma: float        # read from the CPU copy of the schedule (no device sync)
    x: torch.Tensor     # the latent the model saw (model space, float32, on the model's device)
    v: torch.Tensor     # the guided velocity (float32)
    _sigma_t: torch.Tensor = field(repr=False)
    _x0: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def x0(self) -> torch.Tensor:
        """Predicted clean latent (model space), computed on first access."""
        if self._x0 is None:
            self._x0 = self.x - self._sigma_t * self.v
        return self._x0


StepCallback = Callable[[Step], None]


class NonFiniteError(ZImageError):
    """NaN or inf appeared in the latent."""


def _guided(model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor,
            uncond: Optional[torch.Tensor], cfg: float, max_batch: int) -> torch.Tensor:
    """One guided velocity. With cfg != 1 the negative runs batched with the positive when both
    captions have the same length (one DiT call of batch 2B), else as a second call."""
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
    """``model_fn`` over the batch in pieces of at most ``max_batch`` (0 = all at once), in float32."""
    if max_batch <= 0 or x.shape[0] <= max_batch:
        return model_fn(x, sigma, cap).float()
    return torch.cat([model_fn(x[i:i + max_batch], sigma[i:i + max_batch], cap[i:i + max_batch]).float()
                      for i in range(0, x.shape[0], max_batch)])


def start_latent(noise: torch.Tensor, sigma0: torch.Tensor, x_init: Optional[torch.Tensor]) -> torch.Tensor:
    """The latent at the first sigma: pure noise, or ComfyUI's ``sigma*noise + (1-sigma)*x_init``."""
    x = noise.float()
    if x_init is None:
        return x
    return sigma0 * x + (1.0 - sigma0) * x_init.to(x)


def sample(model_fn: ModelFn, noise: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor, *,
           uncond: Optional[torch.Tensor] = None, cfg: float = 1.0, x_init: Optional[torch.Tensor] = None,
           max_batch: int = 0, callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Run the Euler loop and return the final latent (model space, float32).

    noise: [B,16,h,w] standard normal on the model's device; sigmas: [n+1] decreasing, ending at 0
    for a full denoise (a CPU tensor; it is copied to the device once); x_init: model-space latent to
    start from (image-to-image), mixed with the noise at ``sigmas[0]``; cond/uncond: [1,L,C] caption
    features; max_batch: largest batch per DiT call (0 = all at once).
    """
    host = sigmas.detach().to("cpu", torch.float32)
    if noise.device.type == "cuda":  # pinned + non_blocking: even the one copy of the schedule does not sync
        sig = host.pin_memory().to(noise.device, non_blocking=True)
    else:
        sig = host.to(noise.device)
    x = start_latent(noise, sig[0], x_init)
    n = len(host) - 1
    b = x.shape[0]
    for i in range(n):
        v = _guided(model_fn, x, sig[i].expand(b), cond, uncond, cfg, max_batch)
        if callback is not None:
            callback(Step(i, n, float(host[i]), x, v, sig[i]))
        x = x + (sig[i + 1] - sig[i]) * v
    return x


def check_finite(x: torch.Tensor, context: str) -> None:
    """Raise NonFiniteError (one host sync, after the loop) when x holds NaN or inf."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteError(
            f"The sampler produced NaN/inf values ({bad} of {x.numel()} latent values) with {context}.",
            expected="finite latents",
            fix="in Z-Image Loader set dit_dtype to bf16 (or fp32) rather than fp16 or fp8, and keep the "
                "memory policy's compute dtype bf16/fp32; if it persists the DiT file may be damaged "
                "(re-download z_image_turbo_bf16.safetensors)")
