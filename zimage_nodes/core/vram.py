"""Memory measurement for the VRAM monitor: snapshots, a per-prompt recorder of node spans and peaks,
a sampling thread that runs only while a prompt is measured, the Pillow plot, and the OOM message.

No ComfyUI here. GPU numbers come from NVML (``pynvml``, shipped as nvidia-ml-py) when it imports and
finds the device, else from ``torch.cuda.mem_get_info``; PyTorch's allocator gives allocated,
reserved and peak bytes; psutil gives the host side. Without CUDA only host memory is measured.

Per-node peaks are exact, not sampled: the allocator's peak counter is reset when a node starts and
read when it finishes (``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated``). The
sampling thread only draws the timeline (device-wide use, reserved, host RSS) between those events.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

MiB = 1024 ** 2
GiB = 1024 ** 3

SAMPLE_INTERVAL_S = 0.05          # timeline resolution while a prompt runs (20 Hz)
MAX_SAMPLES = 8192                # past this the timeline is halved and the interval doubled
THREAD_NAME = "zimage-vram-sampler"


def fmt_bytes(n: Optional[float]) -> str:
    """1536 MiB -> '1.50 GiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 1024:.0f} KiB"


# ---------------------------------------------------------------- snapshots


@dataclass(frozen=True)
class Snapshot:
    """Memory at one instant. Device fields are None without CUDA."""
    t: float                               # time.perf_counter()
    host_rss: int                          # this process
    host_used: int                         # whole machine (total - available)
    host_total: int
    device_used: Optional[int] = None      # whole device, every process (NVML or cudaMemGetInfo)
    device_total: Optional[int] = None
    allocated: Optional[int] = None        # PyTorch's caching allocator, this process
    reserved: Optional[int] = None
    peak_allocated: Optional[int] = None   # since the last reset (a node start while recording)
    gpu_util: Optional[int] = None         # percent, NVML only

    def to_json(self, t0: float = 0.0) -> dict[str, Any]:
        d = asdict(self)
        d["t"] = round(self.t - t0, 4)
        return d


def _load_nvml() -> Any:
    """The pynvml module, initialised, or None (not installed, no driver, no permission)."""
    try:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded, ...
        return None


_NVML_LOCK = threading.Lock()
_NVML: list[Any] = []   # [module or None] once tried: nvmlInit is process-wide and not repeated


def nvml_module() -> Any:
    with _NVML_LOCK:
        if not _NVML:
            _NVML.append(_load_nvml())
        return _NVML[0]


def _nvml_handle(nvml: Any, device: torch.device) -> Any:
    """The NVML handle of a torch CUDA device, matched by UUID (CUDA_VISIBLE_DEVICES renumbers devices)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is not None:
        want = str(uuid).lower()
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            got = nvml.nvmlDeviceGetUUID(h)
            got = got.decode() if isinstance(got, bytes) else str(got)
            if got.lower().removeprefix("gpu-").removeprefix("mig-") == want.removeprefix("gpu-"):
                return h
        return None
    return nvml.nvmlDeviceGetHandleByIndex(index)


class MemoryProbe:
    """Reads memory of one torch device (CUDA) plus the host. ``device`` None or CPU = host only.

    ``nvml`` may be passed (a pynvml-like module) for tests; by default it is imported when present."""

    def __init__(self, device: torch.device | str | None = None, *, nvml: Any = "auto",
                 process: Any = None) -> None:
        import psutil
        dev = torch.device(device) if device is not None else None
        self.cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
        self.device = dev if self.cuda else torch.device("cpu")
        if self.cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._psutil = psutil
        self._proc = process if process is not None else psutil.Process()
        self._nvml = None
        self._handle = None
        self.name = "host memory"
        self.source = "host"
        if self.cuda:
            self.name = torch.cuda.get_device_name(self.device)
            self.source = "cudaMemGetInfo"
            mod = nvml_module() if nvml == "auto" else nvml
            if mod is not None:
                try:
                    self._handle = _nvml_handle(mod, self.device)
                except Exception:  # NVMLError of any kind: fall back to cudaMemGetInfo
                    self._handle = None
                if self._handle is not None:
                    self._nvml = mod
                    self.source = "NVML"

    def describe(self) -> str:
        if not self.cuda:
            return "no CUDA device: host memory only (process RSS and system RAM)"
        return f"{self.device} {self.name} ({self.source})"

    def snapshot(self) -> Snapshot:
        t = time.perf_counter()
        rss = int(self._proc.memory_info().rss)
        vm = self._psutil.virtual_memory()
        host = dict(host_rss=rss, host_used=int(vm.total - vm.available), host_total=int(vm.total))
        if not self.cuda:
            return Snapshot(t=t, **host)
        stats = torch.cuda.memory_stats(self.device)
        used = total = util = None
        if self._nvml is not None:
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
                used, total = int(mem.used), int(mem.total)
                util = int(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception:  # NVMLError_NotSupported (e.g. MIG) or a transient failure: use CUDA
                used = total = util = None
        if used is None:
            free, total = torch.cuda.mem_get_info(self.device)
            used, total = int(total - free), int(total)
        return Snapshot(t=t, **host, device_used=used, device_total=total,
                        allocated=int(stats.get("allocated_bytes.all.current", 0)),
                        reserved=int(stats.get("reserved_bytes.all.current", 0)),
                        peak_allocated=int(stats.get("allocated_bytes.all.peak", 0)), gpu_util=util)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_allocated(self) -> Optional[int]:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else None


# ---------------------------------------------------------------- node spans and the prompt recorder


@dataclass
class NodeSpan:
    """One node of the prompt: when it ran and the most memory it used."""
    node_id: str
    label: str
    start: float
    end: Optional[float] = None
    cached: bool = False                     # ComfyUI reused its output: it did not run
    start_allocated: Optional[int] = None
    end_allocated: Optional[int] = None
    peak_allocated: Optional[int] = None     # exact (allocator peak counter), CUDA only
    peak_device_used: Optional[int] = None   # sampled, every process on the device
    peak_rss: Optional[int] = None           # sampled, this process
    shared_peak: bool = False                # another node overlapped: peak covers both

    @property
    def duration(self) -> Optional[float]:
        return None if self.end is None else self.end - self.start

    def peak(self, cuda: bool) -> Optional[int]:
        """The number the report and plot use: the allocator's peak on CUDA, the RSS peak without."""
        return self.peak_allocated if cuda else self.peak_rss

    def to_json(self, t0: float = 0.0) -> dict[str, Any]:
        d = asdict(self)
        d["start"] = round(self.start - t0, 4)
        d["end"] = None if self.end is None else round(self.end - t0, 4)
        d["duration"] = None if self.duration is None else round(self.duration, 4)
        return d


@dataclass
class Timeline:
    """A copy of what a recorder holds, for the report, the plot and the HTTP route."""
    prompt_id: str
    t0: float
    t_end: float
    cuda: bool
    device: str                      # "cuda:0 NVIDIA H100 80GB HBM3 (NVML)" / "no CUDA device: ..."
    spans: list[NodeSpan]
    samples: list[Snapshot]
    notes: list[str] = field(default_factory=list)

    def peak_span(self, exclude: Optional[str] = None) -> Optional[NodeSpan]:
        """The finished node with the highest peak (``exclude``: the monitor's own id)."""
        ran = [s for s in self.spans if s.end is not None and not s.cached and s.node_id != exclude
               and s.peak(self.cuda) is not None]
        return max(ran, key=lambda s: s.peak(self.cuda)) if ran else None


class _SamplerThread(threading.Thread):
    def __init__(self, recorder: "PromptRecorder", stop_when: Optional[Callable[[], bool]]) -> None:
        super().__init__(name=THREAD_NAME, daemon=True)
        self.recorder = recorder
        self.stop_when = stop_when
        self.stop_event = threading.Event()

    def run(self) -> None:
        rec = self.recorder
        try:
            while not self.stop_event.wait(rec.interval):
                if self.stop_when is not None and self.stop_when():
                    break
                rec.sample()
        except Exception as e:  # a failing probe must not take the prompt down: keep what was sampled
            rec.notes.append(f"Sampling stopped early: {type(e).__name__}: {e}")


class PromptRecorder:
    """Records one prompt: node start/finish events give spans and exact allocator peaks; a sampling
    thread (started by the first node, stopped by ``stop_sampling``) fills the timeline between them.

    Events come from the executor thread, samples from the sampling thread, reads from anywhere."""

    def __init__(self, probe: MemoryProbe, prompt_id: str = "", *, interval: float = SAMPLE_INTERVAL_S,
                 max_samples: int = MAX_SAMPLES) -> None:
        self.probe = probe
        self.prompt_id = prompt_id
        self.interval = interval
        self.max_samples = max_samples
        self.t0 = time.perf_counter()
        self.notes: list[str] = []
        self._spans: dict[str, NodeSpan] = {}
        self._samples: deque[Snapshot] = deque()
        self._lock = threading.Lock()
        self._thread: Optional[_SamplerThread] = None

    # -- events (executor thread)

    def node_started(self, node_id: str, label: str) -> None:
        snap = self.sample()
        with self._lock:
            overlapping = [s for s in self._spans.values() if s.end is None and not s.cached]
            span = NodeSpan(node_id, label, snap.t, start_allocated=snap.allocated,
                            peak_device_used=snap.device_used, peak_rss=snap.host_rss)
            self._spans[node_id] = span
            if overlapping:   # async nodes can overlap: the counter then covers both
                for s in overlapping + [span]:
                    s.shared_peak = True
        if not overlapping:
            self.probe.reset_peak()

    def node_finished(self, node_id: str, label: str) -> None:
        peak = self.probe.peak_allocated()
        snap = self.sample()
        with self._lock:
            span = self._spans.get(node_id)
            if span is None or span.end is not None:   # finished without a start: a cached output
                self._spans[node_id] = NodeSpan(node_id, label, snap.t, snap.t, cached=True)
                return
            span.end = snap.t
            span.end_allocated = snap.allocated
            if peak is not None:
                span.peak_allocated = max(peak, snap.allocated or 0)

    # -- sampling

    def sample(self) -> Snapshot:
        snap = self.probe.snapshot()
        with self._lock:
            self._samples.append(snap)
            if len(self._samples) > self.max_samples:   # keep the whole prompt at a coarser step
                kept = list(self._samples)[::2]
                self._samples = deque(kept)
                self.interval *= 2
            for s in self._spans.values():
                if s.end is None and not s.cached:
                    s.peak_rss = max(s.peak_rss or 0, snap.host_rss)
                    if snap.device_used is not None:
                        s.peak_device_used = max(s.peak_device_used or 0, snap.device_used)
        return snap

    @property
    def sampling(self) -> bool:
        t = self._thread
        return t is not None and t.is_alive()

    def start_sampling(self, stop_when: Optional[Callable[[], bool]] = None) -> None:
        """Start the sampling thread unless it runs. ``stop_when`` is polled each tick as a guard."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = _SamplerThread(self, stop_when)
            self._thread.start()

    def stop_sampling(self, timeout: float = 2.0) -> None:
        """Stop and join the sampling thread (no-op when none runs)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.stop_event.set()
        if thread is not threading.current_thread():
            thread.join(timeout)

    # -- reads

    def timeline(self) -> Timeline:
        with self._lock:
            spans = [NodeSpan(**asdict(s)) for s in self._spans.values()]
            samples = list(self._samples)
        t_end = max([time.perf_counter()] + [s.t for s in samples])
        return Timeline(self.prompt_id, self.t0, t_end, self.probe.cuda, self.probe.describe(), spans, samples,
                        list(self.notes))

    def samples_since(self, t_rel: float = -1.0, limit: int = 600) -> list[Snapshot]:
        """Samples after ``t_rel`` seconds from the prompt's start (as ``Snapshot.to_json`` rounds them)."""
        with self._lock:
            out = [s for s in self._samples if round(s.t - self.t0, 4) > t_rel]
        return out[-limit:]


# ---------------------------------------------------------------- the text report


def _pct(measured: int, predicted: int) -> str:
    return f"{(measured - predicted) / predicted * 100:+.1f}%" if predicted else "n/a"


def format_report(tl: Timeline, now: Snapshot, *, monitor_id: Optional[str] = None,
                  budget_bytes: Optional[int] = None, predicted_peak: Optional[int] = None) -> str:
    """The monitor's text: device, memory now, every node that finished before the monitor (time and
    peak), the prompt's peak and the policy's prediction against it."""
    lines = [f"Z-Image VRAM Monitor, prompt {tl.prompt_id[:8] or '-'}"]
    lines.append(f"Device: {tl.device}")
    if tl.cuda:
        util = f", GPU util {now.gpu_util}%" if now.gpu_util is not None else ""
        lines.append(f"Now: device used {fmt_bytes(now.device_used)} of {fmt_bytes(now.device_total)} "
                     f"(all processes); PyTorch allocated {fmt_bytes(now.allocated)}, reserved "
                     f"{fmt_bytes(now.reserved)}; host RSS {fmt_bytes(now.host_rss)}{util}")
    else:
        lines.append(f"Now: host RSS {fmt_bytes(now.host_rss)}; RAM used {fmt_bytes(now.host_used)} of "
                     f"{fmt_bytes(now.host_total)}")
    spans = [s for s in tl.spans if s.node_id != monitor_id]
    done = [s for s in spans if s.end is not None]
    lines.append(f"Nodes finished before this monitor ({len(done)}):" if done else
                 "No node finished before this monitor in this prompt (connect it after the nodes to measure).")
    peak_name = "peak alloc" if tl.cuda else "peak RSS"
    for s in done:
        if s.cached:
            lines.append(f"  #{s.node_id:<4} {s.label:<24} cached (did not run)")
            continue
        extra = ""
        if tl.cuda:
            extra = (f"  device used max {fmt_bytes(s.peak_device_used)}  RSS max {fmt_bytes(s.peak_rss)}")
        shared = " (shared with an overlapping node)" if s.shared_peak else ""
        lines.append(f"  #{s.node_id:<4} {s.label:<24} {s.duration:8.3f} s  {peak_name} {fmt_bytes(s.peak(tl.cuda))}"
                     f"{shared}{extra}")
    running = [s for s in spans if s.end is None]
    for s in running:
        lines.append(f"  #{s.node_id:<4} {s.label:<24} still running")
    top = tl.peak_span(monitor_id)
    measured = top.peak(tl.cuda) if top is not None else None
    if top is not None:
        lines.append(f"Prompt peak: {fmt_bytes(measured)} in #{top.node_id} {top.label}")
    if budget_bytes or predicted_peak:
        parts = []
        if budget_bytes:
            parts.append(f"budget {fmt_bytes(budget_bytes)}")
        if predicted_peak:
            parts.append(f"predicted peak {fmt_bytes(predicted_peak)}")
        if predicted_peak and measured:
            parts.append(f"measured {fmt_bytes(measured)} ({_pct(measured, predicted_peak)} vs prediction)")
        if budget_bytes and measured:
            parts.append("within budget" if measured <= budget_bytes else
                         f"OVER budget by {fmt_bytes(measured - budget_bytes)}")
        lines.append("Policy: " + ", ".join(parts))
    lines.extend(tl.notes)
    lines.append("Nodes that run after this monitor are not included: connect it to the final output.")
    return "\n".join(lines)


# ---------------------------------------------------------------- the plot (Pillow only)

SPAN_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
LINE_COLORS = {"device used": (70, 70, 70), "reserved": (120, 170, 230), "allocated": (20, 60, 200),
               "host RSS": (20, 150, 60)}
BUDGET_COLOR = (220, 30, 30)
PREDICTED_COLOR = (255, 140, 0)
MEASURED_COLOR = (110, 40, 160)


@dataclass(frozen=True)
class PlotLayout:
    """Where things were drawn (tests read pixels through it)."""
    width: int
    height: int
    plot_box: tuple[int, int, int, int]       # left, top, right, bottom
    strip_box: tuple[int, int, int, int]      # the node span strip under the plot
    # (node id, its box in the strip, its colour), one per node drawn
    span_boxes: tuple[tuple[str, tuple[int, int, int, int], tuple[int, int, int]], ...]


def plot_geometry(width: int, height: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(plot box, node span strip box) of a plot of this size, as (left, top, right, bottom)."""
    width, height = max(int(width), 320), max(int(height), 200)
    left, right, top, bottom = 64, width - 96, 44, height - 46
    return (left, top, right, bottom), (left, bottom + 4, right, bottom + 16)


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / max(ticks, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _dashed(draw, x0: float, x1: float, y: float, color, width: int = 2, dash: int = 8) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + dash, x1), y)], fill=color, width=width)
        x += dash * 2


def _series(tl: Timeline) -> dict[str, list[tuple[float, int]]]:
    out: dict[str, list[tuple[float, int]]] = {}
    keys = ("device used", "reserved", "allocated", "host RSS") if tl.cuda else ("host RSS",)
    attr = {"device used": "device_used", "reserved": "reserved", "allocated": "allocated", "host RSS": "host_rss"}
    for k in keys:
        pts = [(s.t, getattr(s, attr[k])) for s in tl.samples if getattr(s, attr[k]) is not None]
        if pts:
            out[k] = pts
    return out


def render_plot(tl: Timeline, *, width: int = 1024, height: int = 512, budget_bytes: Optional[int] = None,
                predicted_peak: Optional[int] = None, monitor_id: Optional[str] = None):
    """Memory over the prompt's time: one line per measure, node spans shaded (and a solid strip under
    the axis), each node's peak as a bar across its span, the budget and predicted peak as dashed
    lines, and predicted vs measured peak as two bars on the right. Returns (PIL image, PlotLayout)."""
    from PIL import Image, ImageDraw
    width, height = max(int(width), 320), max(int(height), 200)
    small, normal = _font(11), _font(13)
    (left, top, right, bottom), strip = plot_geometry(width, height)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    spans = [s for s in tl.spans if s.node_id != monitor_id and not s.cached]
    series = _series(tl)
    t_start = min([tl.t0] + [s.start for s in spans] + [p[0] for v in series.values() for p in v[:1]])
    t_stop = max([tl.t_end] + [s.end for s in spans if s.end is not None])
    t_len = max(t_stop - t_start, 1e-3)
    top_peak = tl.peak_span(monitor_id)
    measured = top_peak.peak(tl.cuda) if top_peak is not None else None
    peaks = [s.peak(tl.cuda) for s in spans]
    values = [v for pts in series.values() for _, v in pts] + [p for p in peaks if p is not None]
    values += [v for v in (budget_bytes, predicted_peak, measured) if v]
    y_max = max(values + [MiB]) * 1.08
    step = _nice_step(y_max / GiB) * GiB

    def X(t: float) -> float:
        return left + (t - t_start) / t_len * (right - left)

    def Y(v: float) -> float:
        return bottom - v / y_max * (bottom - top)

    # node spans: translucent shading in the plot, solid colour in the strip, labels on top
    overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    odraw = ImageDraw.Draw(overlay)
    boxes = []
    for i, s in enumerate(spans):
        color = SPAN_COLORS[i % len(SPAN_COLORS)]
        x0 = X(s.start)
        x1 = max(X(s.end if s.end is not None else t_stop), x0 + 3)
        odraw.rectangle([x0, top, x1, bottom], fill=color + (38,))
        boxes.append((s.node_id, (int(round(x0)), strip[1], int(round(x1)), strip[3]), color))
    img.paste(Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB"))
    draw = ImageDraw.Draw(img)

    # axes and grid
    v = 0.0
    while v <= y_max:
        y = Y(v)
        draw.line([(left, y), (right, y)], fill=(230, 230, 230))
        label = f"{v / GiB:g} GiB" if step >= GiB / 4 else f"{v / MiB:.0f} MiB"
        draw.text((left - 6, y), label, fill=(60, 60, 60), font=small, anchor="rm")
        v += step
    t_step = _nice_step(t_len, 8)
    t = 0.0
    while t <= t_len + 1e-9:
        x = X(t_start + t)
        draw.line([(x, bottom), (x, bottom + 3)], fill=(60, 60, 60))
        draw.text((x, strip[3] + 4), f"{t:g}s", fill=(60, 60, 60), font=small, anchor="mt")
        t += t_step
    draw.rectangle([left, top, right, bottom], outline=(60, 60, 60))

    # strip and span labels, peak bars
    for (node_id, (x0, y0, x1, y1), color), s in zip(boxes, spans):
        draw.rectangle([x0, y0, x1, y1], fill=color)
        label = f"#{node_id} {s.label}"
        if draw.textlength(label, font=small) + 4 <= x1 - x0:
            draw.text((x0 + 2, top + 2), label, fill=tuple(c // 2 for c in color), font=small)
        peak = s.peak(tl.cuda)
        if peak is not None:
            y = Y(peak)
            dark = tuple(c * 2 // 3 for c in color)
            draw.line([(x0, y), (x1, y)], fill=dark, width=3)
            cx = (x0 + x1) / 2
            draw.polygon([(cx - 4, y - 7), (cx + 4, y - 7), (cx, y - 1)], fill=dark)
            text = fmt_bytes(peak).replace(" GiB", "G").replace(" MiB", "M")
            if draw.textlength(text, font=small) + 4 <= max(x1 - x0, 40):
                draw.text((cx, y - 8), text, fill=dark, font=small, anchor="mb")

    # memory lines
    for name, pts in series.items():
        color = LINE_COLORS[name]
        xy = [(X(t), Y(v)) for t, v in pts]
        if len(xy) == 1:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=color)
        else:
            draw.line(xy, fill=color, width=2)

    # budget and predicted peak
    if budget_bytes:
        _dashed(draw, left, right, Y(budget_bytes), BUDGET_COLOR)
        draw.text((right - 4, Y(budget_bytes) - 2), f"budget {fmt_bytes(budget_bytes)}", fill=BUDGET_COLOR,
                  font=small, anchor="rb")
    if predicted_peak:
        _dashed(draw, left, right, Y(predicted_peak), PREDICTED_COLOR, dash=4)
        draw.text((left + 4, Y(predicted_peak) - 2), f"predicted peak {fmt_bytes(predicted_peak)}",
                  fill=PREDICTED_COLOR, font=small, anchor="lb")

    # predicted vs measured peak, side by side on the right
    bars = [("pred.", predicted_peak, PREDICTED_COLOR), ("meas.", measured, MEASURED_COLOR)]
    bx = right + 14
    for name, value, color in bars:
        if value:
            draw.rectangle([bx, Y(value), bx + 28, bottom], fill=color)
            draw.text((bx + 14, Y(value) - 2), fmt_bytes(value).replace(" GiB", "G").replace(" MiB", "M"),
                      fill=color, font=small, anchor="mb")
        draw.text((bx + 14, bottom + 4), name, fill=(60, 60, 60), font=small, anchor="mt")
        bx += 38

    # title and legend
    title = f"Z-Image VRAM  {tl.device}"
    if tl.samples and tl.samples[-1].device_total:
        title += f"  total {fmt_bytes(tl.samples[-1].device_total)}"
    draw.text((8, 6), title, fill=(0, 0, 0), font=normal)
    lx = 8
    legend = [(k, LINE_COLORS[k]) for k in series] + ([("budget", BUDGET_COLOR)] if budget_bytes else []) + \
        ([("predicted", PREDICTED_COLOR)] if predicted_peak else [])
    for name, color in legend:
        draw.line([(lx, 32), (lx + 18, 32)], fill=color, width=3)
        draw.text((lx + 22, 32), name, fill=(40, 40, 40), font=small, anchor="lm")
        lx += 32 + int(draw.textlength(name, font=small))
    if not spans:
        draw.text(((left + right) / 2, (top + bottom) / 2), "no node finished before the monitor",
                  fill=(120, 120, 120), font=normal, anchor="mm")
    layout = PlotLayout(width, height, (left, top, right, bottom), strip, tuple(boxes))
    return img, layout


def image_to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> ComfyUI IMAGE [1, H, W, 3] float32 in 0..1."""
    import numpy as np
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).unsqueeze(0)


# ---------------------------------------------------------------- out-of-memory forensics


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def oom_report(node: str, exc: BaseException, shapes: Mapping[str, tuple], dtypes: Mapping[str, str],
               budget_bytes: Optional[int], predicted_peak: Optional[int], measured_peak: Optional[int],
               suggestion: Optional[str]) -> str:
    """The message a user sees when one of our nodes runs out of memory: which node, the tensors it was
    working on, the budget, predicted against measured peak, and which policy would fit."""
    first = (str(exc).strip().splitlines() or [""])[0]
    lines = [f"[Z-Image] Out of memory in {node}.",
             f"Error: {type(exc).__name__}: {first}" if first else f"Error: {type(exc).__name__}"]
    names = list(dict.fromkeys(list(shapes) + list(dtypes)))
    if names:
        parts = []
        for name in names:
            desc = " ".join(x for x in (_shape(shapes[name]) if name in shapes else "",
                                        dtypes.get(name, "")) if x)
            parts.append(f"{name} {desc}".rstrip())
        lines.append("Tensors: " + "; ".join(parts))
    mem = [f"budget {fmt_bytes(budget_bytes) if budget_bytes else 'none set (all free VRAM)'}",
           f"predicted peak {fmt_bytes(predicted_peak)}", f"measured peak {fmt_bytes(measured_peak)}"]
    if predicted_peak and measured_peak:
        mem[-1] += f" ({_pct(measured_peak, predicted_peak)} vs prediction)"
    lines.append("Memory: " + ", ".join(mem))
    lines.append("Fix: " + (suggestion or "connect a Z-Image Memory Policy with mode auto (it picks the fastest "
                                         "mode that fits), or lower the resolution or batch size"))
    return "\n".join(lines)


def policy_numbers(policy: Any) -> tuple[Optional[int], Optional[int]]:
    """(budget_bytes, predicted_peak_bytes) of any policy-like object (getattr, None when absent)."""
    if policy is None:
        return None, None
    budget = getattr(policy, "budget_bytes", None)
    if budget is None:
        gb = getattr(policy, "budget_gb", None)
        budget = int(gb * GiB) if isinstance(gb, (int, float)) and gb > 0 else None
    predicted = getattr(policy, "predicted_peak_bytes", None)
    return (int(budget) if budget else None), (int(predicted) if predicted else None)

