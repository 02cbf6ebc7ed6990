"""CUDA graphs of the DiT forward for one sampler run: the GPU replays a recorded forward instead of
waiting for Python to launch its few thousand kernels one by one.

Why. A compiled 1024x1024 forward's kernels add up to less than the forward's wall time: between
kernels the GPU waits for the CPU (dynamo guards, inductor wrappers, cuBLAS and attention launches).
A graph replays the whole forward from one launch.

How (``StepGraphs``, wrapping the sampler's ``model_fn``):
- the first call with an input signature (shapes, dtypes, device of x, sigma, caption) runs the model
  normally: it compiles what needs compiling, builds the RoPE table, creates the library handles, and
  its result is the step's result;
- the second call with that signature records the forward into a graph (on a side stream, into a
  private memory pool, inputs copied into static buffers first) and replays it;
- later calls copy the inputs into the static buffers and replay. The output is cloned, so a later
  replay never overwrites what the sampler holds.
At most ``max_graphs`` signatures are recorded (a cfg run with a negative of another length calls the
model with two signatures per step); others run normally. ``close()`` drops the graphs and their pool
(the sampler calls it when the run ends, so nothing stays allocated between prompts and weights that
ComfyUI moves later are never replayed from stale addresses).

Memory: the pool holds one forward's activations for the run, on top of what the ordinary caching
allocator keeps from the first call; the caller enables graphs only with that much headroom.
A failure while recording (an operation that cannot be captured) turns graphs off for the rest of the
run and the step runs normally; ``error`` says why.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Signature = tuple


def signature(x: Tensor, sigma: Tensor, cap: Tensor) -> Signature:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in (x, sigma, cap))


class _Graph:
    """One recorded forward and its static inputs/output."""

    def __init__(self, fn: ModelFn, x: Tensor, sigma: Tensor, cap: Tensor) -> None:
        device = x.device
        self.inputs = (x.clone(), sigma.clone(), cap.clone())
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            # thread_local: only this thread is barred from unsafe CUDA calls while recording, so ComfyUI's
            # other threads (the VRAM monitor's sampler polling cudaMemGetInfo) neither break the recording
            # nor get an error themselves
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.output = fn(*self.inputs)
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)

    def __call__(self, x: Tensor, sigma: Tensor, cap: Tensor) -> Tensor:
        for static, value in zip(self.inputs, (x, sigma, cap)):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output.clone()


class StepGraphs:
    """``model_fn`` for the sampler, replaying CUDA graphs of ``fn`` (module docstring)."""

    def __init__(self, fn: ModelFn, max_graphs: int = 1, *, record: Callable[..., ModelFn] | None = None,
                 device_types: tuple[str, ...] = ("cuda",)) -> None:
        """``record(fn, x, sigma, cap)`` returns the replaying callable (default: a CUDA graph; tests pass
        their own with ``device_types=("cpu",)``)."""
        self.fn = fn
        self.max_graphs = max_graphs
        self.record = record or _Graph
        self.device_types = device_types
        self.seen: set[Signature] = set()
        self.graphs: dict[Signature, ModelFn] = {}
        self.error: Optional[str] = None
        self.replays = 0

    def __call__(self, x: Tensor, sigma: Tensor, cap: Tensor) -> Tensor:
        if self.error is not None or x.device.type not in self.device_types:
            return self.fn(x, sigma, cap)
        sig = signature(x, sigma, cap)
        graph = self.graphs.get(sig)
        if graph is None:
            if sig not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(sig)
                return self.fn(x, sigma, cap)
            try:
                graph = self.record(self.fn, x, sigma, cap)
            except Exception as exc:  # noqa: BLE001 - an uncapturable operation: run without graphs
                self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
                self.close()
                if x.device.type == "cuda":
                    torch.cuda.synchronize(x.device)
                return self.fn(x, sigma, cap)
            self.graphs[sig] = graph
        self.replays += 1
        return graph(x, sigma, cap)

    def close(self) -> None:
        self.graphs.clear()
