"""core/vram.py on the CPU: probes (host, and CUDA/NVML through fakes), the prompt recorder and its
sampling thread, the report, the plot and the OOM message; monitor.PromptListener's thread lifetime."""
from __future__ import annotations

import asyncio
import re
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from zimage_nodes.core import vram
from zimage_nodes.core.vram import GiB, MiB


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == vram.THREAD_NAME]


class FakeProbe:
    """A CUDA-like probe with a simulated caching allocator (current and peak bytes)."""

    cuda = True

    def __init__(self, host_rss: int = 2 * GiB) -> None:
        self.host_rss = host_rss
        self.allocated = 1 * GiB
        self.peak = self.allocated
        self.resets = 0

    def alloc(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n

    def describe(self) -> str:
        return "cuda:0 Fake GPU (NVML)"

    def snapshot(self) -> vram.Snapshot:
        return vram.Snapshot(t=time.perf_counter(), host_rss=self.host_rss, host_used=8 * GiB, host_total=64 * GiB,
                             device_used=self.allocated + 512 * MiB, device_total=80 * GiB,
                             allocated=self.allocated, reserved=self.allocated + 256 * MiB,
                             peak_allocated=self.peak, gpu_util=97)

    def reset_peak(self) -> None:
        self.resets += 1
        self.peak = self.allocated

    def peak_allocated(self) -> int:
        return self.peak


# ---------------------------------------------------------------- probes

def test_fmt_bytes():
    assert vram.fmt_bytes(None) == "n/a"
    assert vram.fmt_bytes(1536 * MiB) == "1.50 GiB"
    assert vram.fmt_bytes(300 * MiB) == "300 MiB"
    assert vram.fmt_bytes(2048) == "2 KiB"


def test_host_probe_without_cuda_measures_host_memory_and_says_so():
    probe = vram.MemoryProbe("cpu")
    assert not probe.cuda
    assert "no CUDA" in probe.describe() and "host" in probe.describe()
    snap = probe.snapshot()
    assert snap.host_rss > 0 and 0 < snap.host_used <= snap.host_total
    assert snap.device_used is None and snap.allocated is None and snap.gpu_util is None
    probe.reset_peak()
    assert probe.peak_allocated() is None
    assert vram.MemoryProbe(None).describe() == probe.describe()


class FakeNVML:
    """Two GPUs; the torch device maps to the second one by UUID (as with CUDA_VISIBLE_DEVICES=1)."""

    def __init__(self, fail_memory: bool = False) -> None:
        self.fail_memory = fail_memory

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"h{i}"

    def nvmlDeviceGetUUID(self, h):
        return {"h0": b"GPU-00000000-aaaa", "h1": "GPU-11111111-bbbb"}[h]

    def nvmlDeviceGetMemoryInfo(self, h):
        if self.fail_memory:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return SimpleNamespace(used={"h0": 1 * GiB, "h1": 30 * GiB}[h], total=80 * GiB)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=88)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda answering as one GPU whose UUID is NVML's second device."""
    calls = {"reset": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake H100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="11111111-bbbb"))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d=None: {
        "allocated_bytes.all.current": 10 * GiB, "reserved_bytes.all.current": 12 * GiB,
        "allocated_bytes.all.peak": 11 * GiB})
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (60 * GiB, 80 * GiB))

    def reset(d=None):
        calls["reset"] += 1

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: 11 * GiB)
    return calls


def test_cuda_probe_reads_nvml_of_the_matching_device(fake_cuda):
    probe = vram.MemoryProbe("cuda", nvml=FakeNVML())
    assert probe.cuda and probe.source == "NVML" and probe.device == torch.device("cuda", 0)
    assert probe.describe() == "cuda:0 Fake H100 (NVML)"
    snap = probe.snapshot()
    assert (snap.device_used, snap.device_total, snap.gpu_util) == (30 * GiB, 80 * GiB, 88)
    assert (snap.allocated, snap.reserved, snap.peak_allocated) == (10 * GiB, 12 * GiB, 11 * GiB)
    probe.reset_peak()
    assert fake_cuda["reset"] == 1 and probe.peak_allocated() == 11 * GiB


def test_cuda_probe_falls_back_to_mem_get_info(fake_cuda):
    probe = vram.MemoryProbe("cuda:0", nvml=None)
    assert probe.source == "cudaMemGetInfo"
    snap = probe.snapshot()
    assert (snap.device_used, snap.device_total, snap.gpu_util) == (20 * GiB, 80 * GiB, None)
    # NVML present but failing on memory queries (e.g. MIG): the same fallback, per snapshot
    snap = vram.MemoryProbe("cuda:0", nvml=FakeNVML(fail_memory=True)).snapshot()
    assert (snap.device_used, snap.device_total) == (20 * GiB, 80 * GiB)


# ---------------------------------------------------------------- recorder

def test_recorder_gives_exact_per_node_peaks_and_marks_cached_nodes():
    probe = FakeProbe()
    rec = vram.PromptRecorder(probe, "p1")
    rec.node_started("1", "ZImageLoader")
    probe.alloc(6 * GiB)            # weights stay
    rec.node_finished("1", "ZImageLoader")
    rec.node_started("3", "ZImageSampler")
    probe.alloc(4 * GiB)            # activations, then freed
    probe.free(4 * GiB)
    rec.node_finished("3", "ZImageSampler")
    rec.node_finished("2", "ZImageTextEncode")   # finish without start = ComfyUI reused its output
    spans = {s.node_id: s for s in rec.timeline().spans}
    assert spans["1"].peak_allocated == 7 * GiB
    assert spans["3"].peak_allocated == 11 * GiB   # the counter was reset at the node's start
    assert spans["3"].start_allocated == spans["3"].end_allocated == 7 * GiB
    assert spans["2"].cached and spans["2"].peak(True) is None and spans["2"].peak(False) is None
    assert probe.resets == 2
    assert spans["1"].duration >= 0 and spans["3"].start >= spans["1"].end
    assert spans["3"].peak_device_used >= 7 * GiB + 512 * MiB and spans["3"].peak_rss == 2 * GiB
    assert rec.timeline().peak_span().node_id == "3"


def test_the_prompt_peak_is_a_vram_peak_of_a_finished_node_never_the_running_monitor():
    probe = FakeProbe(host_rss=50 * GiB)   # host RSS far above any VRAM number
    rec = vram.PromptRecorder(probe)
    rec.node_started("3", "ZImageSampler")
    probe.alloc(3 * GiB)
    rec.node_finished("3", "ZImageSampler")
    rec.node_started("9", "ZImageVRAMMonitor")
    tl = rec.timeline()
    assert tl.peak_span("9").node_id == "3" and tl.peak_span().node_id == "3"
    text = vram.format_report(tl, probe.snapshot(), monitor_id="9")
    assert "Prompt peak: 4.00 GiB in #3 ZImageSampler" in text
    img, layout = vram.render_plot(tl, monitor_id="9")
    assert [b[0] for b in layout.span_boxes] == ["3"]


def test_overlapping_nodes_share_one_peak_counter():
    probe = FakeProbe()
    rec = vram.PromptRecorder(probe)
    rec.node_started("a", "AsyncNode")
    probe.alloc(3 * GiB)
    rec.node_started("b", "Other")        # a is still running: no reset, both flagged
    rec.node_finished("b", "Other")
    rec.node_finished("a", "AsyncNode")
    spans = {s.node_id: s for s in rec.timeline().spans}
    assert probe.resets == 1
    assert spans["a"].shared_peak and spans["b"].shared_peak
    assert spans["a"].peak_allocated == spans["b"].peak_allocated == 4 * GiB


def test_sampling_thread_runs_only_between_start_and_stop():
    rec = vram.PromptRecorder(FakeProbe(), interval=0.005)
    assert not sampler_threads()
    rec.start_sampling()
    rec.start_sampling()   # idempotent
    assert len(sampler_threads()) == 1 and rec.sampling
    time.sleep(0.08)
    rec.stop_sampling()
    assert not sampler_threads() and not rec.sampling
    n = len(rec.timeline().samples)
    assert n >= 3
    time.sleep(0.03)
    assert len(rec.timeline().samples) == n   # nothing sampled after the stop
    rec.stop_sampling()   # no-op


def test_sampling_thread_stops_itself_when_its_guard_says_so():
    rec = vram.PromptRecorder(FakeProbe(), interval=0.002)
    done = threading.Event()
    rec.start_sampling(stop_when=done.is_set)
    time.sleep(0.01)
    done.set()
    deadline = time.time() + 2
    while sampler_threads() and time.time() < deadline:
        time.sleep(0.005)
    assert not sampler_threads()


def test_a_failing_probe_stops_sampling_with_a_note():
    probe = FakeProbe()
    rec = vram.PromptRecorder(probe, interval=0.002)

    def broken():
        raise RuntimeError("driver gone")

    probe.snapshot = broken
    rec.start_sampling()
    deadline = time.time() + 2
    while sampler_threads() and time.time() < deadline:
        time.sleep(0.005)
    assert not sampler_threads()
    assert any("driver gone" in n for n in rec.notes)


def test_long_prompts_are_kept_whole_at_a_coarser_step():
    rec = vram.PromptRecorder(FakeProbe(), interval=0.05, max_samples=10)
    for _ in range(25):
        rec.sample()
    tl = rec.timeline()
    assert len(tl.samples) <= 10 and rec.interval > 0.05
    assert [s.t for s in tl.samples] == sorted(s.t for s in tl.samples)
    assert len(rec.samples_since(-1, limit=3)) == 3


# ---------------------------------------------------------------- monitor.PromptListener: thread lifetime

def test_listener_stops_sampling_when_the_prompt_task_ends():
    """ComfyUI runs a prompt as asyncio.run(execute_async(...)): the task's end stops the thread,
    whether or not the monitor node ran (an error before it, an interrupt)."""
    from zimage_nodes.monitor import PromptListener
    rec = vram.PromptRecorder(FakeProbe(), interval=0.005)
    listener = PromptListener(rec)

    async def prompt():
        listener.node_started("1", "ZImageLoader")
        await asyncio.sleep(0.03)
        assert rec.sampling
        raise RuntimeError("node failed")   # the prompt ends without the monitor running

    with pytest.raises(RuntimeError):
        asyncio.run(prompt())
    assert not sampler_threads()


def test_listener_without_an_event_loop_stops_after_idle(monkeypatch):
    from zimage_nodes import monitor
    monkeypatch.setattr(monitor, "IDLE_STOP_S", 0.02)
    rec = vram.PromptRecorder(FakeProbe(), interval=0.005)
    listener = monitor.PromptListener(rec)
    listener.node_started("1", "X")
    assert rec.sampling
    deadline = time.time() + 2
    while sampler_threads() and time.time() < deadline:
        time.sleep(0.005)
    assert not sampler_threads()
    listener.reset()


# ---------------------------------------------------------------- report

def _timeline(cuda: bool = True) -> vram.Timeline:
    probe = FakeProbe()
    rec = vram.PromptRecorder(probe, "0123456789abcdef")
    for node_id, label, grow in (("1", "ZImageLoader", 6 * GiB), ("2", "ZImageTextEncode", 0),
                                 ("3", "ZImageSampler", 0)):
        rec.node_started(node_id, label)
        probe.alloc(grow + 2 * GiB)
        time.sleep(0.002)
        probe.free(2 * GiB)
        rec.node_finished(node_id, label)
    rec.node_finished("5", "ZImageTextEncode")   # cached
    rec.node_started("9", "ZImageVRAMMonitor")    # the monitor itself (running)
    tl = rec.timeline()
    if not cuda:
        tl.cuda = False
        tl.device = vram.MemoryProbe("cpu").describe()
        for s in tl.spans:
            s.peak_allocated = None
    return tl


def test_report_lists_the_nodes_before_the_monitor_with_times_and_peaks():
    tl = _timeline()
    text = vram.format_report(tl, FakeProbe().snapshot(), monitor_id="9")
    assert text.startswith("Z-Image VRAM Monitor, prompt 01234567")
    assert "Device: cuda:0 Fake GPU (NVML)" in text and "GPU util 97%" in text
    assert re.search(r"#1\s+ZImageLoader\s+\d+\.\d{3} s\s+peak alloc 9\.00 GiB", text)
    assert re.search(r"#3\s+ZImageSampler\s+\d+\.\d{3} s\s+peak alloc 9\.00 GiB", text)
    assert re.search(r"#5\s+ZImageTextEncode\s+cached", text)
    assert "ZImageVRAMMonitor" not in text
    assert "Prompt peak: 9.00 GiB" in text
    assert "connect it to the final output" in text
    assert "Policy" not in text


def test_report_compares_the_policy_prediction_with_the_measured_peak():
    text = vram.format_report(_timeline(), FakeProbe().snapshot(), monitor_id="9",
                              budget_bytes=8 * GiB, predicted_peak=10 * GiB)
    assert "Policy: budget 8.00 GiB, predicted peak 10.00 GiB, measured 9.00 GiB (-10.0% vs prediction)" in text
    assert "OVER budget by 1.00 GiB" in text
    text = vram.format_report(_timeline(), FakeProbe().snapshot(), monitor_id="9", budget_bytes=16 * GiB)
    assert "within budget" in text


def test_report_without_cuda_speaks_of_host_memory():
    tl = _timeline(cuda=False)
    snap = vram.MemoryProbe("cpu").snapshot()
    text = vram.format_report(tl, snap, monitor_id="9")
    assert "no CUDA device: host memory only" in text
    assert "peak RSS" in text and "peak alloc" not in text and "RAM used" in text


def test_report_when_nothing_ran_before_the_monitor():
    rec = vram.PromptRecorder(FakeProbe())
    rec.node_started("9", "ZImageVRAMMonitor")
    text = vram.format_report(rec.timeline(), FakeProbe().snapshot(), monitor_id="9")
    assert "No node finished before this monitor" in text


def test_policy_numbers_accept_any_object():
    assert vram.policy_numbers(None) == (None, None)
    assert vram.policy_numbers(object()) == (None, None)
    assert vram.policy_numbers(SimpleNamespace(budget_bytes=5, predicted_peak_bytes=4)) == (5, 4)
    assert vram.policy_numbers(SimpleNamespace(budget_bytes=None, predicted_peak_bytes=None)) == (None, None)
    assert vram.policy_numbers(SimpleNamespace(budget_gb=2.0)) == (2 * GiB, None)
    assert vram.policy_numbers(SimpleNamespace(budget_gb=0.0)) == (None, None)


# ---------------------------------------------------------------- plot

def _count(img, color) -> int:
    return sum(1 for p in img.getdata() if p == color)


def test_plot_draws_spans_peaks_budget_and_prediction():
    tl = _timeline()
    img, layout = vram.render_plot(tl, width=800, height=400, budget_bytes=12 * GiB, predicted_peak=10 * GiB,
                                   monitor_id="9")
    assert img.size == (800, 400) and (layout.width, layout.height) == (800, 400)
    assert (layout.plot_box, layout.strip_box) == vram.plot_geometry(800, 400)
    # one coloured box per node that ran (not the cached one, not the monitor), each its own colour
    assert [b[0] for b in layout.span_boxes] == ["1", "2", "3"]
    colors = set()
    for node_id, (x0, y0, x1, y1), color in layout.span_boxes:
        assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == color
        colors.add(color)
    assert len(colors) == 3
    assert _count(img, vram.BUDGET_COLOR) > 100
    assert _count(img, vram.PREDICTED_COLOR) > 28 * 50   # the predicted-peak bar
    assert _count(img, vram.MEASURED_COLOR) > 28 * 50    # the measured-peak bar beside it
    for name in ("device used", "allocated", "reserved", "host RSS"):
        assert _count(img, vram.LINE_COLORS[name]) > 0, name


def test_plot_without_policy_or_cuda_and_with_nothing_measured():
    tl = _timeline(cuda=False)
    tl.samples = [vram.MemoryProbe("cpu").snapshot()]
    img, layout = vram.render_plot(tl, width=100, height=50, monitor_id="9")
    assert img.size == (320, 200)   # the smallest legible plot
    assert _count(img, vram.BUDGET_COLOR) == 0 and _count(img, vram.PREDICTED_COLOR) == 0
    assert _count(img, vram.LINE_COLORS["allocated"]) == 0
    empty = vram.PromptRecorder(FakeProbe()).timeline()
    img, layout = vram.render_plot(empty)
    assert img.size == (1024, 512) and layout.span_boxes == ()


def test_image_to_tensor_is_a_comfy_image():
    img, _ = vram.render_plot(_timeline(), width=640, height=320)
    t = vram.image_to_tensor(img)
    assert t.shape == (1, 320, 640, 3) and t.dtype == torch.float32
    assert 0.0 <= float(t.min()) < float(t.max()) <= 1.0


# ---------------------------------------------------------------- OOM message

def test_oom_report_names_node_tensors_budget_and_fix():
    exc = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.7 GiB total)\nmore details")
    text = vram.oom_report("ZImageSampler", exc, {"latent": (1, 16, 128, 128), "cond": (1, 128, 2560)},
                           {"latent": "float32", "cond": "bfloat16", "weights": "float8_e4m3fn"},
                           16 * GiB, 15 * GiB, int(16.5 * GiB), "use mode block_swap (predicted 9.1 GiB)")
    lines = text.splitlines()
    assert lines[0] == "[Z-Image] Out of memory in ZImageSampler."
    assert lines[1] == "Error: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.7 GiB total)"
    assert lines[2] == ("Tensors: latent [1, 16, 128, 128] float32; cond [1, 128, 2560] bfloat16; "
                        "weights float8_e4m3fn")
    assert lines[3] == ("Memory: budget 16.00 GiB, predicted peak 15.00 GiB, measured peak 16.50 GiB "
                        "(+10.0% vs prediction)")
    assert lines[4] == "Fix: use mode block_swap (predicted 9.1 GiB)"


def test_oom_report_with_nothing_known():
    text = vram.oom_report("ZImageTiledUpscale", MemoryError(), {}, {}, None, None, None, None)
    assert text.splitlines() == [
        "[Z-Image] Out of memory in ZImageTiledUpscale.",
        "Error: MemoryError",
        "Memory: budget none set (all free VRAM), predicted peak n/a, measured peak n/a",
        "Fix: connect a Z-Image Memory Policy with mode auto (it picks the fastest mode that fits), or lower "
        "the resolution or batch size"]


def test_any_type_matches_every_socket_type():
    from zimage_nodes.nodes.monitor import ANY
    assert ANY == "*" and not (ANY != "IMAGE") and not ("LATENT" != ANY) and not ("ZIMAGE_MODEL" != ANY)
    assert hash(ANY) == hash("*")
