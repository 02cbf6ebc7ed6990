"""Applying a memory policy to a loaded Z-Image model: where each component sits while it runs.

``plan_for`` resolves the policy (core/policy.py) against the budget ComfyUI reports and ComfyUI's
memory flags; ``dit_session`` / ``te_session`` put the DiT / text encoder where the plan says for the
duration of a stage and leave the card as they found it afterwards; ``run_with_fallback`` catches a
CUDA out-of-memory error, releases what the attempt held, steps down one mode and retries once.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator, Optional, TypeVar

import torch

from . import comfy_bridge as bridge
from .core import policy as P
from .core.streaming import BlockStreamer

T = TypeVar("T")


def flags_policy(policy: Optional[P.Policy]) -> P.Policy:
    """The policy in force: the connected one, or defaults shaped by ComfyUI's memory flags."""
    if policy is not None:
        return policy
    f = bridge.vram_flags()
    if f["cpu"]:
        return P.Policy(mode=P.Mode.CPU)
    if f["gpu_only"] or f["highvram"]:
        return P.Policy(mode=P.Mode.FULL_GPU)
    if f["novram"]:
        return P.Policy(mode=P.Mode.SEQUENTIAL)
    if f["lowvram"]:
        return P.Policy(mode=P.Mode.BLOCK_SWAP)
    return P.Policy()


def budget_bytes(policy: P.Policy, device: torch.device, held: int, notes: list[str]) -> int:
    """The budget in bytes: the policy's (clamped to the card), else what ComfyUI says is free plus
    what our own components already hold (we may move those)."""
    if device.type != "cuda":
        return 0
    total = bridge.total_vram(device)
    if policy.budget_gb > 0:
        want = int(policy.budget_gb * P.GB)
        if want > total:
            notes.append(f"budget {policy.budget_gb:g} GB is more than the card's {total / P.GB:.1f} GB; "
                         f"using {total / P.GB:.1f} GB")
            return total
        return want
    return min(total, bridge.free_vram(device) + held)


def dit_units(dit: torch.nn.Module) -> list[torch.nn.Module]:
    """The DiT's streamable blocks in execution order."""
    return list(dit.context_refiner) + list(dit.noise_refiner) + list(dit.layers)


def te_units(te: torch.nn.Module) -> list[torch.nn.Module]:
    return list(te.model.layers)


def _move_other(module: torch.nn.Module, units: list[torch.nn.Module], device: torch.device) -> None:
    """Move every parameter/buffer that is not inside a streamed unit."""
    inside = {id(t) for u in units for t in list(u.parameters()) + list(u.buffers())}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in inside:
            continue
        owner, _, leaf = name.rpartition(".")
        m = module.get_submodule(owner) if owner else module
        cur = getattr(m, leaf)
        if isinstance(cur, torch.nn.Parameter):
            cur.data = cur.data.to(device)
        else:
            setattr(m, leaf, cur.to(device))


@contextlib.contextmanager
def streamed(module: torch.nn.Module, units: list[torch.nn.Module], device: torch.device, resident: int,
             prefetch: int) -> Iterator[BlockStreamer]:
    """Run ``module`` on ``device`` with its blocks streamed; afterwards everything is back on the CPU."""
    streamer = BlockStreamer(units, device, resident, prefetch)
    try:
        _move_other(module, units, device)
        streamer.install()
        yield streamer
    finally:
        streamer.remove()
        _move_other(module, units, torch.device("cpu"))
        gc.collect()
        bridge.soft_empty_cache()


@contextlib.contextmanager
def dit_session(model, plan: P.Plan) -> Iterator[Optional[BlockStreamer]]:
    """The DiT placed for the plan's mode for the duration of sampling."""
    patcher = model.dit_patcher
    mode = plan.mode
    if mode in (P.Mode.FULL_GPU, P.Mode.MODEL_OFFLOAD):
        if mode is P.Mode.MODEL_OFFLOAD:
            bridge.unload([model.te_patcher, model.vae_patcher])
        bridge.load_on_device([patcher])
        yield None
        return
    bridge.unload([patcher, model.te_patcher, model.vae_patcher])
    if mode is P.Mode.CPU:
        model.dit.to("cpu")
        yield None
        return
    device = patcher.load_device
    bridge.free_memory(plan.peaks.get("dit", plan.peak), device)
    with streamed(model.dit, dit_units(model.dit), device, plan.resident_dit, plan.prefetch) as s:
        yield s


@contextlib.contextmanager
def te_session(model, plan: P.Plan) -> Iterator[torch.device]:
    """The text encoder placed for the plan's mode while it encodes; yields the device to feed."""
    te = model.te.module
    mode = plan.mode
    if mode in (P.Mode.FULL_GPU, P.Mode.MODEL_OFFLOAD) or model.te.device.type != "cuda":
        if mode is P.Mode.MODEL_OFFLOAD:
            bridge.unload([model.dit_patcher, model.vae_patcher])
        bridge.load_on_device([model.te_patcher])
        yield model.te.device
        return
    bridge.unload([model.te_patcher, model.dit_patcher, model.vae_patcher])
    if mode is P.Mode.CPU:
        te.to("cpu")
        yield torch.device("cpu")
        return
    device = model.te.device
    with streamed(te, te_units(te), device, plan.resident_te, plan.prefetch):
        yield device


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_with_fallback(policy: P.Policy, plan: P.Plan, attempt: Callable[[P.Plan], T],
                      replan: Callable[[P.Mode], P.Plan], report: list[str]) -> T:
    """Run ``attempt(plan)``; on CUDA OOM (with the fallback on) release memory, step down one mode and
    retry once. Both attempts are reported."""
    try:
        return attempt(plan)
    except Exception as exc:  # narrowed below: only OOM is retried
        if not is_oom(exc) or not policy.oom_fallback:
            raise
        lower = P.step_down(plan.mode)
        if lower is None:
            raise
        first = f"attempt 1: {plan.describe()} ran out of memory ({str(exc).splitlines()[0][:200]})"
        bridge.warn(first)
        report.append(first)
        del exc
        gc.collect()
        bridge.soft_empty_cache()
        plan2 = replan(lower)
        report.append(f"attempt 2: {plan2.describe()}")
        bridge.warn(report[-1])
        return attempt(plan2)


def make_policy(mode: str, budget_gb: float, dit_weights: str, attention: str, vae_mode: str, vae_tile: int,
                resident_blocks: int, prefetch: int, cache_clear_interval: int,
                oom_fallback: bool) -> tuple[P.Policy, str]:
    """Validate the node's inputs into a Policy; adjustments become notes in the report."""
    from .core.attention import resolve_backend
    from .core.errors import InputError
    notes: list[str] = []
    try:
        m, w, v = P.Mode(mode), P.DiTWeights(dit_weights), P.VAEMode(vae_mode)
    except ValueError as e:
        raise InputError(f"Z-Image Memory Policy: {e}.", fix="pick a value from the list") from e
    if attention != "auto":
        backend, reason = resolve_backend(attention)
        if reason:
            notes.append(reason)
            attention = backend
    device = bridge.torch_device()
    if w is P.DiTWeights.FP8_FAST:
        reason = fp8_matmul_unavailable(torch.device("cpu") if m is P.Mode.CPU else device)
        if reason:
            notes.append(f"fp8_fast: {reason}; using fp8 storage (per-tensor scales) with bf16 matmuls")
            w = P.DiTWeights.FP8
    if budget_gb > 0 and device.type == "cuda":
        total = bridge.total_vram(device) / P.GB
        if budget_gb > total:
            notes.append(f"budget {budget_gb:g} GB is more than this card's {total:.1f} GB: clamped")
            budget_gb = total
    policy = P.Policy(mode=m, budget_gb=budget_gb, dit_weights=w, attention=attention, vae_mode=v,
                      vae_tile=int(vae_tile), resident_blocks=int(resident_blocks), prefetch=int(prefetch),
                      cache_clear_interval=int(cache_clear_interval), oom_fallback=bool(oom_fallback),
                      notes=tuple(notes))
    text = (f"mode {m.value}, budget {'ComfyUI free VRAM' if budget_gb <= 0 else f'{budget_gb:g} GB'}, "
            f"DiT {w.value}, attention {attention}, VAE {v.value} ({vae_tile} px tiles), "
            f"OOM fallback {'on' if oom_fallback else 'off'}")
    return policy, "\n".join([text, *notes])


def _has_fp8_matmul(device: Optional[torch.device] = None) -> bool:
    """Whether the (default) CUDA device has fp8 tensor-core matmuls: compute capability 8.9+ (Ada, Hopper,
    Blackwell) and ``torch._scaled_mm``."""
    if not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")):
        return False
    if device is not None and device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_matmul_unavailable(device: torch.device) -> Optional[str]:
    """Why the DiT on ``device`` cannot use fp8 matmuls, or None when it can."""
    if device.type != "cuda":
        return f"fp8 matmuls need a CUDA GPU (the DiT runs on {device.type})"
    if not _has_fp8_matmul(device):
        return "this GPU has no fp8 matmuls (needs compute capability 8.9+ and torch._scaled_mm)"
    return None


# ---------------------------------------------------------------- planning a run for a loaded model

STREAMED_MODES = (P.Mode.BLOCK_SWAP, P.Mode.SEQUENTIAL)


def sizes_for(plan_sources, dit_storage: torch.dtype, te_storage: torch.dtype, vae_dtype: torch.dtype) -> P.Sizes:
    """Component sizes from the headers at the storage dtypes (known before anything is allocated)."""
    def nbytes(dtype: torch.dtype) -> float:
        return torch.empty(0, dtype=dtype).element_size()
    return P.sizes_from_shapes(plan_sources.dit.shapes, plan_sources.text_encoder.shapes, plan_sources.vae.shapes,
                               nbytes(dit_storage), nbytes(te_storage), nbytes(vae_dtype))


def _on_cuda(module: Optional[torch.nn.Module]) -> bool:
    p = next(module.parameters(), None) if module is not None else None
    return p is not None and p.device.type == "cuda"


def held_bytes(model) -> int:
    """Bytes our own components hold on the GPU now (we may move them, so they count as available)."""
    s = model.sizes
    return ((s.dit if _on_cuda(model.dit) else 0) + (s.vae if _on_cuda(model.vae.model) else 0)
            + (s.te if _on_cuda(model.te.module) else 0))


RETRY_BUDGET_FRACTION = 0.8  # after an out-of-memory error the retry plans for this much of the budget


def plan_for(model, req: P.Request, notes: list[str], mode: Optional[P.Mode] = None,
             after_oom: bool = False) -> P.Plan:
    """Resolve the model's policy for one run (``mode`` forces a mode, for the OOM fallback).

    ``after_oom``: the retry after an out-of-memory error plans for ``RETRY_BUDGET_FRACTION`` of the
    budget (measured again, now that the failed attempt's memory is released): the error proved that the
    estimate or the card's free memory was off, and the allocator's cache may be fragmented. On an H200
    (bench/oom_gpu.py) a retry planned to the full 11.6 GB that was free ran out of memory again."""
    policy = model.policy if mode is None else P.with_mode(model.policy, mode)
    device = model.dit_patcher.load_device
    budget = budget_bytes(policy, device, held_bytes(model), notes)
    if after_oom and budget:
        budget = int(budget * RETRY_BUDGET_FRACTION)
    plan = P.plan(policy, model.sizes, req, budget, has_cuda=device.type == "cuda")
    notes.extend(n for n in plan.notes if n not in notes)
    policy.last.update(budget_bytes=plan.budget or None, predicted_peak_bytes=plan.peak or None, mode=plan.mode.value)
    return plan


def load_device_for_dit(policy: P.Policy, sizes: P.Sizes, device: torch.device, notes: list[str]) -> torch.device:
    """Where the loader streams the DiT: its GPU when the default run (1024x1024) keeps it resident,
    else host memory, from which the sampler streams its blocks."""
    if device.type != "cuda":
        return device
    budget = budget_bytes(policy, device, 0, notes)
    plan = P.plan(policy, sizes, P.Request(1024, 1024), budget)
    return torch.device("cpu") if plan.mode in STREAMED_MODES or plan.mode is P.Mode.CPU else device


def storage_override(policy: P.Policy, dit_dtype: str, notes: list[str]) -> str:
    """The policy's DiT weight storage wins over the loader's dtype choice when it asks for fp8 (e4m3: the
    format of the fp8 matmuls and of ComfyUI's fp8 repacks). ``notes`` is kept for callers' symmetry; the
    loader says what is in effect (``prepare_dit_weights``)."""
    if policy.dit_weights is P.DiTWeights.BF16:
        return dit_dtype
    return "fp8_e4m3fn"


def prepare_dit_weights(dit: torch.nn.Module, policy: P.Policy, storage: torch.dtype, compute: torch.dtype,
                        device: torch.device) -> Optional[str]:
    """Set the loaded DiT's matmuls up for the policy (``device``: where it runs) and say what is in effect:
    fp8 storage has per-tensor scales (core/ops.py); ``fp8_fast`` turns on fp8 matmuls (torch._scaled_mm)
    for the blocks' attention and feed-forward linears when the GPU has them, else says why not. None for
    storage that is not fp8."""
    from .core import ops
    if storage not in ops.FP8_DTYPES:
        return None
    head = f"DiT: fp8 weights ({str(storage).replace('torch.', '')}) with per-tensor scales"
    matmul = str(compute).replace("torch.", "").replace("bfloat16", "bf16").replace("float32", "fp32")
    if policy.dit_weights is not P.DiTWeights.FP8_FAST:
        return f"{head}, {matmul} matmuls (weights dequantized per call)"
    reason = fp8_matmul_unavailable(device)
    if reason is None and storage != ops.E4M3:
        reason = "fp8 matmuls need e4m3 weights"
    if reason is None:
        n = ops.set_fp8_matmul(dit, True)
        return (f"{head}, fp8 matmuls (torch._scaled_mm) in the {n} attention/feed-forward linears of the "
                f"blocks (activations scaled per token); embedders, adaLN and final layer dequantized to {matmul}")
    ops.set_fp8_matmul(dit, False)
    return f"{head}, {matmul} matmuls: fp8_fast fell back ({reason})"
