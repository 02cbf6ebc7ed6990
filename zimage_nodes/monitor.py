"""The VRAM monitor's orchestration: when a prompt holding a monitor node starts, a recorder is hooked
to ComfyUI's per-node progress events for that prompt; the node turns what was recorded into a
report and a plot; the /zimage/vram route serves a live snapshot and the running prompt's samples.

How the hook is made, without replacing anything in ComfyUI:
- ComfyUI builds a fresh progress registry at the start of every prompt and, right after, computes
  the prompt's cache signatures, which calls each node's ``IS_CHANGED``. The monitor's ``IS_CHANGED``
  calls :func:`arm`, which registers our handler on that registry (its public ``add_progress_handler``).
  From then on every node's start and finish reach the recorder. The registry, and our handler with
  it, is dropped when the next prompt starts, so nothing stays hooked into prompts without a monitor.
- With ``--cache-none`` ComfyUI calls no ``IS_CHANGED``; the monitor then hooks itself in when it runs
  and says that nodes before it were not recorded.

Threads: the sampling thread starts with the first node of a prompt that holds a monitor and stops
when the monitor node runs, when the prompt's asyncio task ends (success, error or interrupt), or
when ComfyUI resets the registry. Nothing is sampled between prompts; the route samples on request.
"""
from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Callable, Optional

import torch

from . import comfy_bridge as bridge
from .core import vram

LISTENER_NAME = "zimage_vram_monitor"
ROUTE = "/zimage/vram"
IDLE_STOP_S = 300.0   # without an asyncio task to watch, sampling stops after this long without a node event


class PromptListener:
    """Receives one prompt's node events (through the bridge's progress adapter) and drives a recorder."""

    def __init__(self, recorder: vram.PromptRecorder) -> None:
        self.recorder = recorder
        self._task: Optional[asyncio.Task] = None
        self._last_event = time.perf_counter()

    def node_started(self, node_id: str, label: str) -> None:
        self._last_event = time.perf_counter()
        stop_when = self._stop_condition()
        self.recorder.node_started(node_id, label)
        self.recorder.start_sampling(stop_when)

    def node_finished(self, node_id: str, label: str) -> None:
        self._last_event = time.perf_counter()
        self.recorder.node_finished(node_id, label)

    def reset(self) -> None:
        self.recorder.stop_sampling()

    def _stop_condition(self) -> Callable[[], bool]:
        """Sampling ends with the prompt: ComfyUI runs each prompt as one asyncio task (asyncio.run in
        PromptExecutor.execute); its done callback stops the thread at once, success or not."""
        try:
            task = asyncio.current_task()
        except RuntimeError:   # no event loop: an executor without asyncio
            task = None
        if task is None:
            return lambda: time.perf_counter() - self._last_event > IDLE_STOP_S
        if task is not self._task:
            self._task = task
            task.add_done_callback(lambda _t: self.recorder.stop_sampling())
        return task.done


@functools.lru_cache(maxsize=4)
def _probe(device: str) -> vram.MemoryProbe:
    return vram.MemoryProbe(device)


def _device() -> str:
    return str(bridge.torch_device())


def arm() -> bool:
    """Hook a recorder to the running prompt's node events (once per prompt). Returns whether one is hooked."""
    if bridge.progress_listener(LISTENER_NAME) is not None:
        return True
    recorder = vram.PromptRecorder(_probe(_device()))
    prompt_id = bridge.add_progress_listener(LISTENER_NAME, PromptListener(recorder))
    if prompt_id is None:
        return False
    recorder.prompt_id = prompt_id
    return True


def collect(node_id: Optional[str], policy: Any = None, width: int = 1024,
            height: int = 512) -> tuple[str, torch.Tensor]:
    """What the monitor node outputs: the report text and the plot (IMAGE [1, H, W, 3])."""
    notes = []
    listener = bridge.progress_listener(LISTENER_NAME)
    if listener is None:
        notes.append("Nodes before this monitor were not recorded: ComfyUI did not call the monitor when the "
                     "prompt started (it does not with --cache-none). Memory now is shown.")
        arm()
        listener = bridge.progress_listener(LISTENER_NAME)
    if listener is not None:
        recorder = listener.recorder
        recorder.stop_sampling()   # what this monitor reports is measured; a later node restarts it
    else:                          # outside ComfyUI's executor (a direct call)
        recorder = vram.PromptRecorder(_probe(_device()))
    now = recorder.sample()
    timeline = recorder.timeline()
    timeline.notes.extend(notes)
    budget, predicted = vram.policy_numbers(policy)
    text = vram.format_report(timeline, now, monitor_id=node_id, budget_bytes=budget, predicted_peak=predicted)
    image, _layout = vram.render_plot(timeline, width=width, height=height, budget_bytes=budget,
                                      predicted_peak=predicted, monitor_id=node_id)
    return text, vram.image_to_tensor(image)


def route_payload(query: dict[str, str]) -> dict[str, Any]:
    """GET /zimage/vram: a snapshot taken now, and the running (or last) monitored prompt's nodes and
    samples newer than ``?since=<seconds since that prompt started>``."""
    probe = _probe(_device())
    snap = probe.snapshot()
    out: dict[str, Any] = {"time": time.time(), "device": probe.describe(), "cuda": probe.cuda,
                           "snapshot": snap.to_json(snap.t), "prompt": None}
    listener = bridge.progress_listener(LISTENER_NAME)
    if listener is not None:
        rec = listener.recorder
        try:
            since = float(query.get("since", -1))
        except ValueError:
            since = -1.0
        tl = rec.timeline()
        out["prompt"] = {"id": rec.prompt_id, "sampling": rec.sampling, "elapsed": round(snap.t - rec.t0, 4),
                         "nodes": [s.to_json(rec.t0) for s in tl.spans],
                         "samples": [s.to_json(rec.t0) for s in rec.samples_since(since)]}
    return out


def register_routes() -> bool:
    """Add GET /zimage/vram to the running ComfyUI server (nothing outside one)."""
    return bridge.add_get_route(ROUTE, route_payload)
