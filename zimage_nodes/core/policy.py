"""Memory policies: how the three components share a VRAM budget, and a peak-VRAM estimator.

Modes, fastest first: ``full_gpu`` (everything resident), ``model_offload`` (components take turns on
the GPU: text encoder, then DiT, then VAE), ``block_swap`` (the DiT's and text encoder's blocks stream
from pinned host memory, some resident), ``sequential`` (the floor: nothing resident, two blocks in
flight), ``cpu``. ``auto`` picks the fastest mode whose predicted peak fits the budget with a margin.

The estimator counts bytes: weights by component and block (from the loaded modules), activations
as bytes per token (calibrated on the GPU, see bench/), VAE decode workspace per pixel.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional

from .errors import InputError

GB = 1024 ** 3


class Mode(str, Enum):
    AUTO = "auto"
    FULL_GPU = "full_gpu"
    MODEL_OFFLOAD = "model_offload"
    BLOCK_SWAP = "block_swap"
    SEQUENTIAL = "sequential"
    CPU = "cpu"


FASTEST_FIRST = [Mode.FULL_GPU, Mode.MODEL_OFFLOAD, Mode.BLOCK_SWAP, Mode.SEQUENTIAL, Mode.CPU]


class DiTWeights(str, Enum):
    BF16 = "bf16"
    FP8 = "fp8"            # fp8 storage with per-tensor scales, bf16 matmuls
    FP8_FAST = "fp8_fast"  # fp8 storage and fp8 matmuls where the GPU has them (sm_89+)


class VAEMode(str, Enum):
    AUTO = "auto"
    FULL = "full"
    TILED = "tiled"


# Activation model (bf16): bytes per token of the DiT's sequence at the widest point of a block
# (qkv, SwiGLU intermediates, residual) plus a constant, per-pixel VAE decode workspace. Fitted to
# one DiT forward at 512..2048 px, batch 1..4 on an H200 (bench/bench_pipeline.py, peer "calib";
# docs/BENCHMARKS.md): 91.7 kB/token + 37 MB.
DIT_ACT_BYTES_PER_TOKEN = 91_700
DIT_ACT_CONSTANT = 37 * 1024 ** 2
TE_ACT_BYTES_PER_TOKEN = 60_000
VAE_BYTES_PER_PIXEL_FULL = 2_600   # untiled decode, bf16
VAE_TILE_OVERHEAD = 1.15            # a tile's workspace relative to an untiled decode of the same size
WORKSPACE = 256 * 1024 ** 2         # cuBLAS/cuDNN workspaces, RoPE tables, sampler state
MARGIN = 0.08                       # auto keeps this fraction of the budget free


@dataclass(frozen=True)
class Policy:
    """The payload of a ZIMAGE_POLICY socket (user settings; resolved per run by plan())."""
    mode: Mode = Mode.AUTO
    budget_gb: float = 0.0          # 0 = what ComfyUI says is free, minus its reserve
    dit_weights: DiTWeights = DiTWeights.BF16
    attention: str = "auto"
    vae_mode: VAEMode = VAEMode.AUTO
    vae_tile: int = 512
    resident_blocks: int = -1       # block_swap: -1 = as many as the budget allows
    prefetch: int = 2
    cache_clear_interval: int = 0   # empty the CUDA cache every N DiT forwards (0 = never)
    oom_fallback: bool = True
    notes: tuple[str, ...] = ()
    # the last plan made with this policy (budget and predicted peak, bytes): the VRAM monitor, fed the
    # same policy object, draws them beside what it measured
    last: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def budget_bytes(self) -> Optional[int]:
        return self.last.get("budget_bytes") or (int(self.budget_gb * GB) if self.budget_gb > 0 else None)

    @property
    def predicted_peak_bytes(self) -> Optional[int]:
        return self.last.get("predicted_peak_bytes")


@dataclass(frozen=True)
class Sizes:
    """Bytes of the loaded components, by part (from the modules themselves)."""
    dit_blocks: tuple[int, ...]   # streamable blocks in execution order (refiners then main layers)
    dit_other: int
    te_blocks: tuple[int, ...]
    te_other: int
    vae: int

    @property
    def dit(self) -> int:
        return sum(self.dit_blocks) + self.dit_other

    @property
    def te(self) -> int:
        return sum(self.te_blocks) + self.te_other


@dataclass(frozen=True)
class Request:
    width: int
    height: int
    batch: int = 1
    caption_tokens: int = 128
    cfg_batch: int = 1            # 2 when the negative runs batched with the positive

    @property
    def tokens(self) -> int:
        img = (self.height // 16) * (self.width // 16)
        cap = -(-self.caption_tokens // 32) * 32
        return self.batch * self.cfg_batch * (-(-img // 32) * 32 + cap)


@dataclass
class Plan:
    mode: Mode
    budget: int                     # bytes
    resident_dit: int               # blocks kept on the GPU (block modes)
    resident_te: int
    prefetch: int
    vae_tiled: bool
    vae_tile: int
    peak: int                       # predicted peak allocated bytes
    peaks: dict[str, int] = field(default_factory=dict)  # per stage
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"mode {self.mode.value}", f"budget {self.budget / GB:.2f} GB",
                 f"predicted peak {self.peak / GB:.2f} GB"]
        if self.mode in (Mode.BLOCK_SWAP, Mode.SEQUENTIAL):
            parts.append(f"{self.resident_dit} DiT blocks resident, prefetch {self.prefetch}")
        parts.append("VAE tiled %d px" % self.vae_tile if self.vae_tiled else "VAE untiled")
        return ", ".join(parts)


def _dit_act(req: Request) -> int:
    return req.tokens * DIT_ACT_BYTES_PER_TOKEN + DIT_ACT_CONSTANT


def graph_headroom(plan: Plan, req: Request) -> bool:
    """Whether a CUDA graph of the DiT forward fits (core/graphs.py): the DiT resident (full_gpu or
    model_offload, no block streaming) and room in the budget for a second set of one forward's
    activations (the graph's private pool) above the plan's DiT peak."""
    return (plan.mode in (Mode.FULL_GPU, Mode.MODEL_OFFLOAD)
            and plan.peaks.get("dit", plan.peak) + _dit_act(req) <= plan.budget)


def _vae_peak(sizes: Sizes, req: Request, tiled: bool, tile: int) -> int:
    px = tile * tile if tiled else req.width * req.height
    ws = VAE_BYTES_PER_PIXEL_FULL * px * (VAE_TILE_OVERHEAD if tiled else 1.0)
    return sizes.vae + int(ws) * (1 if tiled else req.batch)


def _te_peak(sizes: Sizes, resident: int, slots: int, streamed: bool, req: Request) -> int:
    act = req.caption_tokens * TE_ACT_BYTES_PER_TOKEN + WORKSPACE
    if not streamed:
        return sizes.te + act
    blk = max(sizes.te_blocks, default=0)
    return sizes.te_other + sum(sizes.te_blocks[:resident]) + slots * blk + act


def _block_peak(sizes: Sizes, resident: int, slots: int, req: Request) -> int:
    blk = max(sizes.dit_blocks, default=0)
    return sizes.dit_other + sum(sizes.dit_blocks[:resident]) + slots * blk + _dit_act(req)


def _dit_gpu_weights(mode: Mode, sizes: Sizes, resident_dit: int, slots: int) -> int:
    """DiT bytes left on the GPU after sampling (they stay for the next image while the VAE decodes)."""
    if mode in (Mode.FULL_GPU, Mode.MODEL_OFFLOAD):
        return sizes.dit
    blk = max(sizes.dit_blocks, default=0)
    return sizes.dit_other + sum(sizes.dit_blocks[:resident_dit]) + slots * blk


def predict(mode: Mode, sizes: Sizes, req: Request, *, resident_dit: int = 0, resident_te: int = 0,
            prefetch: int = 2, vae_tiled: bool = False, vae_tile: int = 512) -> dict[str, int]:
    """Predicted peak allocated bytes per stage ("te", "dit", "vae") for a mode. The VAE decodes while
    the DiT's GPU part stays (so the next image does not reload it)."""
    slots = 2 if mode is Mode.SEQUENTIAL else prefetch + 1
    if mode is Mode.CPU:
        return {"te": 0, "dit": 0, "vae": 0}
    if mode is Mode.SEQUENTIAL:
        resident_dit, resident_te = 0, 0
    vae = _vae_peak(sizes, req, vae_tiled, vae_tile) + _dit_gpu_weights(mode, sizes, resident_dit, slots)
    if mode is Mode.FULL_GPU:
        return {"te": sizes.dit + sizes.te + sizes.vae + req.caption_tokens * TE_ACT_BYTES_PER_TOKEN + WORKSPACE,
                "dit": sizes.dit + sizes.te + sizes.vae + _dit_act(req), "vae": sizes.te + vae}
    if mode is Mode.MODEL_OFFLOAD:
        return {"te": _te_peak(sizes, 0, 0, False, req), "dit": sizes.dit + _dit_act(req), "vae": vae}
    return {"te": _te_peak(sizes, resident_te, slots, True, req),
            "dit": _block_peak(sizes, resident_dit, slots, req), "vae": vae}


def _fit_resident(blocks: tuple[int, ...], room: int) -> int:
    n, used = 0, 0
    for b in blocks:
        if used + b > room:
            break
        used += b
        n += 1
    return n


def sizes_from_shapes(dit: dict[str, tuple[int, ...]], te: dict[str, tuple[int, ...]],
                      vae: dict[str, tuple[int, ...]], dit_bytes: float = 2, te_bytes: float = 2,
                      vae_bytes: float = 2) -> Sizes:
    """Component sizes from header shapes alone (before anything is allocated), at the given bytes per
    element. DiT blocks in execution order: context_refiner, noise_refiner, layers."""
    import math
    import re

    def group(shapes, pattern):
        blocks: dict[tuple[str, int], int] = {}
        other = 0
        rx = re.compile(pattern)
        for k, s in shapes.items():
            m = rx.search(k)
            n = math.prod(s)
            if m:
                key = (m.group(1), int(m.group(2)))
                blocks[key] = blocks.get(key, 0) + n
            else:
                other += n
        return blocks, other

    d_blocks, d_other = group({k: v for k, v in dit.items() if not k.endswith("norm_final.weight")},
                              r"(context_refiner|noise_refiner|layers)\.(\d+)\.")
    order = {"context_refiner": 0, "noise_refiner": 1, "layers": 2}
    dit_blocks = tuple(int(n * dit_bytes) for _, n in sorted(d_blocks.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])))
    t_blocks, t_other = group(te, r"(layers)\.(\d+)\.")
    te_list = [n for _, n in sorted(t_blocks.items(), key=lambda kv: kv[0][1])][:-1]  # last layer never built
    return Sizes(dit_blocks, int(d_other * dit_bytes), tuple(int(n * te_bytes) for n in te_list),
                 int(t_other * te_bytes), int(sum(math.prod(s) for s in vae.values()) * vae_bytes))


def plan(policy: Policy, sizes: Sizes, req: Request, budget: int, has_cuda: bool = True) -> Plan:
    """Resolve a policy for one run: the mode (auto: the fastest that fits with a margin), how many
    blocks stay resident, and whether the VAE decodes in tiles. Raises BudgetError when no GPU mode fits."""
    if not has_cuda:
        return Plan(Mode.CPU, 0, 0, 0, policy.prefetch, False, policy.vae_tile, 0, notes=["no CUDA device: cpu mode"])
    usable = int(budget * (1 - MARGIN)) if policy.mode is Mode.AUTO else budget
    candidates = FASTEST_FIRST[:-1] if policy.mode is Mode.AUTO else [policy.mode]
    notes = list(policy.notes)
    best: Optional[Plan] = None
    for mode in candidates:
        if mode is Mode.CPU:
            return Plan(Mode.CPU, budget, 0, 0, policy.prefetch, False, policy.vae_tile, 0, notes=notes)
        prefetch = 1 if mode is Mode.SEQUENTIAL else policy.prefetch
        slots = prefetch + 1
        res_dit = res_te = 0
        if mode is Mode.BLOCK_SWAP:
            if policy.resident_blocks >= 0:
                res_dit = min(policy.resident_blocks, len(sizes.dit_blocks))
            else:  # room left beside the larger of the DiT's activations and a tiled VAE decode
                fixed = _block_peak(sizes, 0, slots, req) - _dit_act(req)
                room = usable - fixed - max(_dit_act(req), _vae_peak(sizes, req, True, policy.vae_tile))
                res_dit = _fit_resident(sizes.dit_blocks, room)
            res_te = _fit_resident(sizes.te_blocks, usable - _te_peak(sizes, 0, slots, True, req))
            if res_dit >= len(sizes.dit_blocks):
                res_dit = len(sizes.dit_blocks)
        tiled = policy.vae_mode is VAEMode.TILED
        if policy.vae_mode is VAEMode.AUTO:  # untiled is faster; tile when it would not fit beside the DiT
            untiled = predict(mode, sizes, req, resident_dit=res_dit, resident_te=res_te, prefetch=prefetch)
            tiled = untiled["vae"] > usable
        peaks = predict(mode, sizes, req, resident_dit=res_dit, resident_te=res_te, prefetch=prefetch,
                        vae_tiled=tiled, vae_tile=policy.vae_tile)
        cand = Plan(mode, budget, res_dit, res_te, prefetch, tiled, policy.vae_tile, max(peaks.values()), peaks, notes)
        if cand.peak <= usable or policy.mode is not Mode.AUTO:
            best = cand
            break
    if best is None:
        floor = predict(Mode.SEQUENTIAL, sizes, req, vae_tiled=True, vae_tile=256)
        need = int(max(floor.values()) / (1 - MARGIN))
        raise BudgetError(need, budget)
    if best.peak > budget:
        best.notes.append(f"{best.mode.value} is predicted to need {best.peak / GB:.2f} GB, over the "
                          f"{budget / GB:.2f} GB budget; it may run out of memory")
    return best


def step_down(mode: Mode) -> Optional[Mode]:
    """The next slower, smaller mode (for the OOM fallback), or None below the floor."""
    order = FASTEST_FIRST
    i = order.index(mode)
    return order[i + 1] if i + 1 < len(order) else None


class BudgetError(InputError):
    def __init__(self, needed: int, budget: int) -> None:
        super().__init__(f"`vram_budget_gb`: a VRAM budget of {budget / GB:.2f} GB is too small for any GPU mode.",
                         found=f"{budget / GB:.2f} GB",
                         expected=f"at least {needed / GB:.2f} GB (sequential mode with a tiled VAE)",
                         fix=f"raise the budget to {needed / GB:.1f} GB or more, free VRAM used by other programs, "
                             "or choose mode 'cpu'")
        self.needed, self.budget = needed, budget


def with_mode(policy: Policy, mode: Mode) -> Policy:
    """The same settings with another mode (sharing ``last``, so the fallback's plan is the one recorded)."""
    return replace(policy, mode=mode, last=policy.last)
