"""The memory policy through the real executor on a GPU, with full-size random weights: the low-VRAM
workflow under VRAM caps stays under its budget and streams (run alone: `pytest -m gpu tests/gpu/test_policy_gpu.py`,
weights in $ZIMAGE_GPU_WEIGHTS, written there if missing, about 21 GB)."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from tests.comfy_env import REPO, InProcessComfy

pytestmark = pytest.mark.gpu
GB = 1024 ** 3


@pytest.fixture(scope="module")
def gpu_comfy():
    root = Path(os.environ.get("ZIMAGE_GPU_WEIGHTS", "/tmp/zw"))
    from zimage_nodes.testing import weights
    weights.ensure_single_files(root / "models")
    return InProcessComfy.get(root)


@pytest.mark.parametrize("cap_gb", [8, 4])
def test_low_vram_workflow_stays_under_its_cap(gpu_comfy, cap_gb):
    import comfy.model_management as mm
    prompt = json.loads((REPO / "workflows/api/z_image_turbo_t2i_low_vram.json").read_text())
    prompt = copy.deepcopy(prompt)
    policy = next(n for n in prompt.values() if n["class_type"] == "ZImageMemoryPolicy")
    policy["inputs"]["vram_budget_gb"] = float(cap_gb)
    total = torch.cuda.get_device_properties(0).total_memory
    mm.unload_all_models()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap_gb * GB / total)
    torch.cuda.reset_peak_memory_stats()
    try:
        result = gpu_comfy.run(prompt)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert result.success, result.error
    peak = torch.cuda.max_memory_allocated()
    reports = json.dumps(result.outputs)
    print(f"cap {cap_gb} GB: peak {peak / GB:.2f} GB; {reports[:600]}")
    assert peak <= cap_gb * GB
    assert "block_swap" in reports or "sequential" in reports
