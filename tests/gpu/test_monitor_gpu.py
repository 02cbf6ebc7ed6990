"""The VRAM monitor on a CUDA GPU, through the real in-process ComfyUI executor.

Run on the GPU machine: ``python -m pytest -q -m gpu tests/gpu/test_monitor_gpu.py -s`` (skipped without CUDA).
- per-node peaks: the monitor's number for a node equals torch.cuda.max_memory_allocated taken around
  the same work (within 1%): a test node with a known allocation pattern, and the Z-Image sampler
  re-run directly on the same loaded model;
- NVML (or cudaMemGetInfo) device-wide numbers are consistent with PyTorch's;
- overhead: a GPU-bound node with progress updates (a stand-in for sampling) is not slowed by more
  than 1% when a monitor is in the prompt (its sampling thread runs meanwhile).
"""
from __future__ import annotations

import json
import statistics
import threading
import time

import pytest
import torch

from tests.comfy_env import REPO
from zimage_nodes.core import vram
from zimage_nodes.core.vram import MiB

pytestmark = pytest.mark.gpu

MONITOR = "ZImageVRAMMonitor"
WORK = "ZImageTestGPUWork"


class GPUWork:
    """Test-only node: holds ``mb`` MiB plus ``mb``/2 MiB at once (then frees the half), then multiplies
    8192x8192 bf16 matrices ``iters`` times with a progress update every 10 products, like sampling
    steps. Returns 'entry_allocated own_peak seconds' measured inside its own body."""
    CATEGORY = "testing"
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mb": ("INT", {"default": 1024, "min": 2, "max": 65536}),
                             "iters": ("INT", {"default": 0, "min": 0, "max": 100000}),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31})}}

    def run(self, mb, iters, seed):
        import comfy.utils
        torch.cuda.synchronize()
        entry = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        keep = torch.empty(mb * MiB, dtype=torch.uint8, device="cuda")
        half = torch.empty(mb * MiB // 2, dtype=torch.uint8, device="cuda")
        del half
        if iters:
            x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) / 91.0
            bar = comfy.utils.ProgressBar(iters)
            for i in range(iters):
                x = torch.tanh(x @ x)
                if i % 10 == 9:
                    bar.update(10)
            del x
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        own_peak = torch.cuda.max_memory_allocated()
        del keep
        text = f"{entry} {own_peak} {seconds}"
        return {"ui": {"text": [text]}, "result": (text,)}


@pytest.fixture
def gpu_comfy(comfy):
    comfy.nodes.NODE_CLASS_MAPPINGS[WORK] = GPUWork
    yield comfy
    comfy.nodes.NODE_CLASS_MAPPINGS.pop(WORK, None)


def recorded_spans() -> dict[str, vram.NodeSpan]:
    from zimage_nodes import comfy_bridge, monitor
    listener = comfy_bridge.progress_listener(monitor.LISTENER_NAME)
    assert listener is not None, "the monitor did not hook the last prompt"
    return {s.node_id: s for s in listener.recorder.timeline().spans}


def within(a: float, b: float, rel: float = 0.01) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def test_per_node_peak_matches_max_memory_allocated_around_the_node(gpu_comfy):
    for seed in range(2):
        prompt = {"w": {"class_type": WORK, "inputs": {"mb": 1024, "iters": 20, "seed": seed}},
                  "m": {"class_type": MONITOR, "inputs": {"value": ["w", 0], "plot_width": 1024, "plot_height": 512}}}
        r = gpu_comfy.run(prompt)
        assert r.success, r.error
        entry, own_peak, _ = r.outputs["w"]["text"][0].split()
        span = recorded_spans()["w"]
        expected = int(entry) + 1536 * MiB          # keep + half alive together
        assert within(span.peak_allocated, int(own_peak)), (span.peak_allocated, own_peak)
        assert within(span.peak_allocated, expected), (span.peak_allocated, expected)
        assert "cuda" in r.outputs["m"]["text"][0] and "peak alloc" in r.outputs["m"]["text"][0]
    assert not [t for t in threading.enumerate() if t.name == vram.THREAD_NAME]


def test_sampler_peak_matches_a_direct_run_of_the_same_work(gpu_comfy):
    from zimage_nodes import runtime
    prompt = json.loads((REPO / "workflows/api/z_image_turbo_t2i.json").read_text())
    prompt["3"]["inputs"].update(width=1024, height=1024)
    prompt["12"] = {"class_type": MONITOR, "inputs": {"value": ["3", 1], "plot_width": 1024, "plot_height": 512}}
    prompt["4"]["inputs"]["images"] = ["12", 0]
    for seed in (1, 2):   # the second run re-runs only the sampler, as the direct run below does
        prompt["3"]["inputs"]["seed"] = seed
        r = gpu_comfy.run(prompt)
        assert r.success, r.error
    measured = recorded_spans()["3"].peak_allocated
    model = gpu_comfy.executor.caches.outputs.get("1").outputs[0][0]
    cond = gpu_comfy.executor.caches.outputs.get("2").outputs[0][0]
    i = prompt["3"]["inputs"]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    runtime.sample(model, cond, i["width"], i["height"], 3, i["steps"], i["schedule"], i["shift"], i["cfg"],
                   i["batch_size"], i["max_batch"], i["denoise"])
    torch.cuda.synchronize()
    direct = torch.cuda.max_memory_allocated()
    print(f"\nsampler peak: monitor {measured / MiB:.1f} MiB, direct {direct / MiB:.1f} MiB")
    assert within(measured, direct), (measured, direct)


def test_device_numbers_are_consistent():
    probe = vram.MemoryProbe(torch.device("cuda", torch.cuda.current_device()))
    x = torch.empty(512 * MiB, dtype=torch.uint8, device="cuda")
    snap = probe.snapshot()
    assert snap.allocated >= 512 * MiB and snap.reserved >= snap.allocated
    assert snap.device_total > 0 and snap.reserved <= snap.device_used <= snap.device_total
    t0 = time.perf_counter()
    for _ in range(100):
        probe.snapshot()
    per = (time.perf_counter() - t0) / 100
    print(f"\n{probe.describe()}: one snapshot {per * 1e6:.0f} us "
          f"({per / vram.SAMPLE_INTERVAL_S * 100:.2f}% of a sampling interval)")
    assert per < 0.002
    del x


def test_monitor_overhead_on_gpu_bound_work_is_under_one_percent(gpu_comfy):
    def run(seed: int, with_monitor: bool) -> float:
        prompt = {"w": {"class_type": WORK, "inputs": {"mb": 2, "iters": 600, "seed": seed}}}
        if with_monitor:
            prompt["m"] = {"class_type": MONITOR, "inputs": {"value": ["w", 0], "plot_width": 1024,
                                                             "plot_height": 512}}
        r = gpu_comfy.run(prompt)
        assert r.success, r.error
        return float(r.outputs["w"]["text"][0].split()[2])

    run(0, False)   # warm-up (cuBLAS, clocks)
    run(1, True)
    plain, monitored = [], []
    for k in range(5):   # interleaved, so clock drift hits both alike
        plain.append(run(100 + k, False))
        monitored.append(run(200 + k, True))
    a, b = statistics.median(plain), statistics.median(monitored)
    print(f"\nGPU work: {a:.4f} s without the monitor, {b:.4f} s with it ({(b / a - 1) * 100:+.2f}%)")
    assert b <= a * 1.01, (plain, monitored)
