"""The memory-policy node's inputs and ComfyUI's flags (bridge answers replaced by plain values here;
the GPU path runs in tests/gpu/test_policy_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from zimage_nodes import comfy_bridge, policy_runtime
from zimage_nodes.core import policy as P
from zimage_nodes.core.errors import InputError

GB = P.GB


def _make(**kw):
    args = dict(mode="auto", budget_gb=0.0, dit_weights="bf16", attention="auto", vae_mode="auto", vae_tile=512,
                resident_blocks=-1, prefetch=2, cache_clear_interval=0, oom_fallback=True)
    args.update(kw)
    return policy_runtime.make_policy(**args)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(comfy_bridge, "torch_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(comfy_bridge, "total_vram", lambda device: 24 * GB)
    monkeypatch.setattr(comfy_bridge, "free_vram", lambda device: 20 * GB)


def test_budget_larger_than_the_card_is_clamped_and_said(fake_gpu):
    policy, report = _make(budget_gb=80.0)
    assert policy.budget_gb == pytest.approx(24.0)
    assert "clamped" in report


def test_missing_attention_backend_falls_back_with_a_reason(comfy_modules):
    policy, report = _make(attention="flash")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash_attn is installed here")
    except ImportError:
        pass
    assert policy.attention == "sdpa" and "flash" in report


def test_fp8_matmuls_fall_back_without_support(comfy_modules):
    policy, report = _make(dit_weights="fp8_fast")
    if policy_runtime._has_fp8_matmul():
        pytest.skip("this GPU has fp8 matmuls")
    assert policy.dit_weights is P.DiTWeights.FP8 and "fp8_fast" in report


def test_unknown_mode_is_a_clear_error(comfy_modules):
    with pytest.raises(InputError) as e:
        _make(mode="turbo_mode")
    assert "Fix:" in str(e.value)


@pytest.mark.parametrize("flags,mode", [({"cpu": True}, P.Mode.CPU), ({"gpu_only": True}, P.Mode.FULL_GPU),
                                        ({"highvram": True}, P.Mode.FULL_GPU), ({"lowvram": True}, P.Mode.BLOCK_SWAP),
                                        ({"novram": True}, P.Mode.SEQUENTIAL), ({}, P.Mode.AUTO)])
def test_unconnected_policy_follows_comfyui_flags(monkeypatch, flags, mode):
    base = {"gpu_only": False, "highvram": False, "lowvram": False, "novram": False, "cpu": False}
    monkeypatch.setattr(comfy_bridge, "vram_flags", lambda: {**base, **flags})
    assert policy_runtime.flags_policy(None).mode is mode
    connected = P.Policy(mode=P.Mode.SEQUENTIAL)
    assert policy_runtime.flags_policy(connected) is connected


def test_budget_defaults_to_comfyui_free_vram_plus_what_we_hold(fake_gpu):
    notes: list[str] = []
    assert policy_runtime.budget_bytes(P.Policy(), torch.device("cuda", 0), 3 * GB, notes) == 23 * GB
    assert policy_runtime.budget_bytes(P.Policy(budget_gb=8), torch.device("cuda", 0), 0, notes) == 8 * GB


def test_dit_is_loaded_to_host_memory_when_it_will_stream(fake_gpu):
    from zimage_nodes.testing import weights as W
    f = W.SCALES["full"]
    sizes = P.sizes_from_shapes({t.name: t.shape for t in W.dit_tensors(f.dit)},
                                {t.name: t.shape for t in W.te_tensors(f.te)}, {t.name: t.shape for t in W.vae_tensors(f.vae)})
    cuda = torch.device("cuda", 0)
    assert policy_runtime.load_device_for_dit(P.Policy(budget_gb=8), sizes, cuda, []) == torch.device("cpu")
    assert policy_runtime.load_device_for_dit(P.Policy(), sizes, cuda, []) == cuda  # 20 GB free: resident


def test_the_policy_object_carries_the_last_plan_to_the_monitor():
    from zimage_nodes.core.vram import policy_numbers
    policy = P.Policy(budget_gb=8)
    policy.last.update(budget_bytes=8 * GB, predicted_peak_bytes=7 * GB)
    assert policy_numbers(policy) == (8 * GB, 7 * GB)
    assert P.with_mode(policy, P.Mode.SEQUENTIAL).last is policy.last
