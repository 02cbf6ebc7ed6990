"""Sigma schedules for Z-Image-Turbo.

- ``turbo``: the official Turbo schedule. ``steps`` counts sigmas the way ComfyUI users count steps
  (the seeds' "9 steps = 8 DiT forwards"): ``steps - 1`` forwards at the shifted
  ``linspace(1, 1/n, n)`` with a terminal 0. Built with diffusers' FlowMatchEulerDiscreteScheduler,
  exactly as ZImagePipeline(num_inference_steps=n) builds it.
- ``comfy_simple``: ComfyUI's template schedule (ModelSamplingAuraFlow shift + "simple" scheduler),
  ``steps`` forwards, for parity with the native workflow.
"""
from __future__ import annotations

from enum import Enum

import torch

from .errors import InputError


class Schedule(str, Enum):
    TURBO = "turbo"
    COMFY_SIMPLE = "comfy_simple"


def shift_sigma(s: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Flow-matching time shift: shift*s / (1 + (shift-1)*s)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def turbo_sigmas(forwards: int, shift: float = 3.0) -> torch.Tensor:
    """``forwards`` shifted sigmas from 1 plus a terminal 0 (diffusers' ZImagePipeline schedule)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1.0 / forwards, forwards).tolist())
    return sched.sigmas.to(torch.float32).cpu()


def comfy_simple_sigmas(forwards: int, shift: float = 3.0, timesteps: int = 1000) -> torch.Tensor:
    """ComfyUI's "simple" scheduler over ModelSamplingAuraFlow(shift) sigmas, plus a terminal 0."""
    table = shift_sigma(torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps, shift)
    stride = len(table) / forwards
    sig = [float(table[-(1 + int(i * stride))]) for i in range(forwards)] + [0.0]
    return torch.tensor(sig, dtype=torch.float32)


def make_sigmas(schedule: Schedule | str, steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """Sigmas for a sampler run.

    ``steps`` is what the user typed: for ``turbo`` it counts sigmas (9 -> 8 forwards), for
    ``comfy_simple`` it counts forwards, as ComfyUI's KSampler does. ``denoise < 1`` follows
    ComfyUI's KSampler: build the schedule for ``steps / denoise`` and keep its tail.
    """
    try:
        schedule = Schedule(schedule)
    except ValueError:
        raise InputError(f"`schedule` = {schedule!r} is not a known schedule.",
                         expected=", ".join(s.value for s in Schedule), fix="choose turbo") from None
    if steps < 1 or (schedule is Schedule.TURBO and steps < 2):
        raise InputError(f"`steps` = {steps} gives no denoising step with the {schedule.value} schedule.",
                         expected="steps >= 2 for the turbo schedule (steps counts sigmas: 9 = the official 8 DiT "
                                  "forwards), steps >= 1 for comfy_simple (steps counts DiT forwards)",
                         fix="set steps to 9")
    if not 0.0 <= denoise <= 1.0:  # NaN fails this test too
        raise InputError(f"`denoise` = {denoise} is outside 0..1.", expected="0 <= denoise <= 1",
                         fix="use 1.0 for text-to-image, about 0.3 to refine a latent or image input")
    if not shift > 0.0:
        raise InputError(f"`shift` = {shift} is not positive.", expected="shift > 0 (3 for Z-Image-Turbo)",
                         fix="set shift to 3")
    forwards = steps - 1 if schedule is Schedule.TURBO else steps
    if denoise <= 0.0:
        return torch.zeros(1)
    total = max(forwards, int(forwards / denoise))
    build = turbo_sigmas if schedule is Schedule.TURBO else comfy_simple_sigmas
    return build(total, shift)[-(forwards + 1):].clone()
