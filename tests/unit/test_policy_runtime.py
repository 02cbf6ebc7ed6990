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
    assert "per-tensor scales" in report and "bf16 matmuls" in report
    assert ("needs compute capability 8.9+" in report) if torch.cuda.is_available() else ("need a CUDA GPU" in report)


def test_fp8_matmuls_fall_back_on_a_gpu_without_them(fake_gpu, monkeypatch):
    monkeypatch.setattr(policy_runtime, "_has_fp8_matmul", lambda device=None: False)
    policy, report = _make(dit_weights="fp8_fast")
    assert policy.dit_weights is P.DiTWeights.FP8
    assert "fp8_fast: this GPU has no fp8 matmuls (needs compute capability 8.9+" in report
    monkeypatch.setattr(policy_runtime, "_has_fp8_matmul", lambda device=None: True)
    policy, report = _make(dit_weights="fp8_fast")
    assert policy.dit_weights is P.DiTWeights.FP8_FAST and policy.notes == () and "fell back" not in report
    policy, report = _make(dit_weights="fp8_fast", mode="cpu")  # the DiT runs on the CPU
    assert policy.dit_weights is P.DiTWeights.FP8 and "need a CUDA GPU (the DiT runs on cpu)" in report


def test_fp8_policies_store_the_dit_in_e4m3_with_no_note():
    for w in (P.DiTWeights.FP8, P.DiTWeights.FP8_FAST):
        notes: list[str] = []
        assert policy_runtime.storage_override(P.Policy(dit_weights=w), "bf16", notes) == "fp8_e4m3fn"
        assert notes == []
    assert policy_runtime.storage_override(P.Policy(), "fp32", []) == "fp32"


def _fp8_dit():
    from tests.unit.test_ops import tiny_dit
    from zimage_nodes.core import ops
    model = tiny_dit().to(torch.bfloat16)
    ops.quantize_linears_fp8(model)
    return model


def _flagged(model) -> int:
    from zimage_nodes.core.ops import CastLinear
    return sum(m.fp8_matmul for m in model.modules() if isinstance(m, CastLinear))


def test_prepare_dit_weights_says_what_is_in_effect(monkeypatch):
    fp8, bf16, cuda, cpu = torch.float8_e4m3fn, torch.bfloat16, torch.device("cuda", 0), torch.device("cpu")
    fast, plain = P.Policy(dit_weights=P.DiTWeights.FP8_FAST), P.Policy(dit_weights=P.DiTWeights.FP8)
    model = _fp8_dit()
    assert policy_runtime.prepare_dit_weights(model, P.Policy(), bf16, bf16, cuda) is None
    text = policy_runtime.prepare_dit_weights(model, plain, fp8, bf16, cuda)
    assert text.startswith("DiT: fp8 weights (float8_e4m3fn) with per-tensor scales, bf16 matmuls")
    assert _flagged(model) == 0
    monkeypatch.setattr(policy_runtime, "_has_fp8_matmul", lambda device=None: True)
    text = policy_runtime.prepare_dit_weights(model, fast, fp8, bf16, cuda)
    assert text.startswith("DiT: fp8 weights (float8_e4m3fn) with per-tensor scales, fp8 matmuls (torch._scaled_mm)")
    assert _flagged(model) == 30 and "30 attention/feed-forward linears" in text  # 6 blocks x 5
    text = policy_runtime.prepare_dit_weights(model, fast, fp8, bf16, cpu)  # e.g. dit_device = cpu
    assert "bf16 matmuls: fp8_fast fell back (fp8 matmuls need a CUDA GPU (the DiT runs on cpu))" in text
    assert _flagged(model) == 0
    monkeypatch.setattr(policy_runtime, "_has_fp8_matmul", lambda device=None: False)
    text = policy_runtime.prepare_dit_weights(model, fast, fp8, bf16, cuda)
    assert "fell back (this GPU has no fp8 matmuls" in text and _flagged(model) == 0


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


def test_the_retry_after_out_of_memory_plans_for_a_smaller_budget(fake_gpu):
    """plan_for(after_oom=True) plans the step-down for RETRY_BUDGET_FRACTION of the budget measured again
    (on an H200 a retry planned to all the free memory ran out again: bench/oom_gpu.py)."""
    from types import SimpleNamespace
    sizes = P.Sizes(dit_blocks=(400_000_000,) * 34, dit_other=300_000_000, te_blocks=(200_000_000,) * 35,
                    te_other=800_000_000, vae=168_000_000)
    policy, _ = _make(mode="block_swap", budget_gb=12.0)
    model = SimpleNamespace(policy=policy, sizes=sizes, dit=None, vae=SimpleNamespace(model=None),
                            te=SimpleNamespace(module=None),
                            dit_patcher=SimpleNamespace(load_device=torch.device("cuda", 0)))
    req = P.Request(1024, 1024)
    first = policy_runtime.plan_for(model, req, [])
    retry = policy_runtime.plan_for(model, req, [], P.Mode.BLOCK_SWAP, after_oom=True)
    assert first.budget == 12 * GB
    assert retry.budget == int(12 * GB * policy_runtime.RETRY_BUDGET_FRACTION)
    assert retry.resident_dit < first.resident_dit and retry.peak <= retry.budget
