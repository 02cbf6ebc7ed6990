"""Sigma schedules: the official Turbo table, ComfyUI's template schedule, and bad inputs."""
from __future__ import annotations

import pytest
import torch

from zimage_nodes.core import schedule
from zimage_nodes.core.errors import InputError

OFFICIAL_TURBO = [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
COMFY_TEMPLATE = [1.0, 0.96, 0.9131, 0.8573, 0.7898, 0.7063, 0.6007, 0.4627, 0.2745, 0.0]


def test_turbo_default_is_the_official_eight_forwards():
    sig = schedule.make_sigmas("turbo", 9)
    assert len(sig) == 9  # 8 forwards
    assert torch.allclose(sig, torch.tensor(OFFICIAL_TURBO), atol=1e-4)


def test_turbo_matches_diffusers_pipeline_default_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=get_default_z_image_sigmas(8))
    assert torch.allclose(schedule.turbo_sigmas(8), sched.sigmas.float(), atol=1e-6)


def test_comfy_simple_matches_the_template_table():
    assert torch.allclose(schedule.make_sigmas("comfy_simple", 9), torch.tensor(COMFY_TEMPLATE), atol=1e-4)


def _comfy_sigmas(steps: int, denoise: float = 1.0) -> torch.Tensor:
    import comfy.model_sampling
    import comfy.samplers

    class AuraFlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = AuraFlowSampling(None)
    ms.set_parameters(shift=3.0, multiplier=1.0)  # what ModelSamplingAuraFlow(shift=3) sets
    total = int(steps / denoise) if denoise < 1 else steps
    return comfy.samplers.calculate_sigmas(ms, "simple", total)[-(steps + 1):].float()


@pytest.mark.parametrize("steps,denoise", [(9, 1.0), (4, 1.0), (9, 0.5), (6, 0.3)])
def test_comfy_simple_equals_comfyui_calculate_sigmas(comfy_modules, steps, denoise):
    ours = schedule.make_sigmas("comfy_simple", steps, 3.0, denoise)
    assert torch.allclose(ours, _comfy_sigmas(steps, denoise), atol=1e-5)


def test_denoise_keeps_the_tail_and_zero_denoise_does_nothing():
    full = schedule.turbo_sigmas(26)
    part = schedule.make_sigmas("turbo", 9, 3.0, 0.3)
    assert len(part) == 9 and torch.allclose(part, full[-9:]) and part[0] < 0.7
    assert schedule.make_sigmas("turbo", 9, 3.0, 0.0).tolist() == [0.0]


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=1), dict(steps=9, denoise=1.5),
                                    dict(steps=9, denoise=-0.1)])
def test_bad_inputs_raise_clear_messages(kwargs):
    with pytest.raises(InputError) as e:
        schedule.make_sigmas("turbo", kwargs.pop("steps"), 3.0, **kwargs)
    assert "Fix:" in str(e.value)
