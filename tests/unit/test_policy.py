"""Memory policies: the estimator and chooser, and block streaming (its bookkeeping runs on the CPU too)."""
from __future__ import annotations

import pytest
import torch

from zimage_nodes.core import policy as P
from zimage_nodes.core.dit import ZImageDiT, dit_config_from_shapes
from zimage_nodes.core.streaming import BlockStreamer
from zimage_nodes.testing import weights as W

GB = P.GB


def _shapes(tensors):
    return {t.name: t.shape for t in tensors}


@pytest.fixture(scope="module")
def full_sizes() -> P.Sizes:
    f = W.SCALES["full"]
    return P.sizes_from_shapes(_shapes(W.dit_tensors(f.dit)), _shapes(W.te_tensors(f.te)), _shapes(W.vae_tensors(f.vae)))


def test_sizes_from_full_headers(full_sizes):
    assert len(full_sizes.dit_blocks) == 34 and len(full_sizes.te_blocks) == 35
    assert 11.3 * GB < full_sizes.dit < 11.6 * GB      # 6.15B params in bf16 = 12.3e9 bytes
    assert 7.2 * GB < full_sizes.te < 7.4 * GB         # 35 of 36 layers built


@pytest.mark.parametrize("budget_gb", [80, 16, 12, 8, 6, 4, 3])
def test_auto_fits_every_budget_with_margin(full_sizes, budget_gb):
    plan = P.plan(P.Policy(), full_sizes, P.Request(1024, 1024), int(budget_gb * GB))
    assert plan.peak <= budget_gb * GB * (1 - P.MARGIN)
    assert plan.mode is not P.Mode.CPU


def test_auto_prefers_faster_modes_when_they_fit(full_sizes):
    modes = [P.plan(P.Policy(), full_sizes, P.Request(1024, 1024), int(b * GB)).mode for b in (80, 16, 8)]
    assert modes == [P.Mode.FULL_GPU, P.Mode.MODEL_OFFLOAD, P.Mode.BLOCK_SWAP]
    r8 = P.plan(P.Policy(), full_sizes, P.Request(1024, 1024), 8 * GB).resident_dit
    r4 = P.plan(P.Policy(), full_sizes, P.Request(1024, 1024), 4 * GB).resident_dit
    assert r8 > r4


def test_budget_too_small_names_the_minimum(full_sizes):
    with pytest.raises(P.BudgetError) as e:
        P.plan(P.Policy(), full_sizes, P.Request(1024, 1024), int(0.5 * GB))
    assert "at least" in str(e.value) and "Fix:" in str(e.value)
    assert e.value.needed > 0.5 * GB


def test_step_down_order():
    assert P.step_down(P.Mode.FULL_GPU) is P.Mode.MODEL_OFFLOAD
    assert P.step_down(P.Mode.BLOCK_SWAP) is P.Mode.SEQUENTIAL
    assert P.step_down(P.Mode.CPU) is None


def _tiny_dit(seed=0) -> ZImageDiT:
    spec = W.SCALES["tiny"].dit
    state = {t.name: W.random_tensor(t, seed, "dit", torch.float32) for t in W.dit_tensors(spec)}
    model = ZImageDiT(dit_config_from_shapes({k: tuple(v.shape) for k, v in state.items()}))
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("resident,prefetch", [(0, 1), (2, 2), (1, 3)])
def test_streamed_dit_equals_resident_dit(resident, prefetch):
    model = _tiny_dit()
    x, cap = torch.randn(1, 16, 8, 8), torch.randn(1, 20, 64)
    sigma = torch.tensor([0.7])
    with torch.inference_mode():
        want = model(x, sigma, cap)
        units = list(model.context_refiner) + list(model.noise_refiner) + list(model.layers)
        s = BlockStreamer(units, torch.device("cpu"), resident, prefetch).install()
        got1 = model(x, sigma, cap)
        got2 = model(x, sigma * 0.5, cap)  # the second forward reuses the ring cyclically
        s.remove()
        again = model(x, sigma, cap)
    assert torch.equal(got1, want) and torch.equal(again, want)
    assert not torch.equal(got2, want)
    streamed_bytes = sum(u.nbytes for u in s.streamed)
    assert s.bytes_copied >= streamed_bytes  # every streamed block was copied at least once per forward
