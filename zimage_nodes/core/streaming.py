"""Block streaming: run a model whose repeated blocks do not all fit on the GPU.

``resident`` blocks, evenly spaced, stay on the GPU. The others live in pinned host memory and are copied
into a small ring of GPU slots on a side CUDA stream, ``prefetch`` blocks ahead of the one computing,
cyclically (the next forward's first blocks load during this forward's last ones). A block's
parameters are pointed at its slot just before it runs (a forward pre-hook), and a slot is reused only
after the compute stream has passed the block that used it (CUDA events), so copies overlap compute
and nothing waits on the host. Without CUDA (tests on the CPU) the same bookkeeping runs with
synchronous copies, so the logic is exercised everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


@dataclass
class _Unit:
    module: nn.Module
    names: list[str]              # parameter/buffer names inside the module
    host: list[torch.Tensor]      # pinned host copies, same order as names
    nbytes: int
    resident: bool
    slot: Optional[int] = None    # slot holding it now (streamed units)
    ready: Optional[object] = None  # CUDA event: its copy has finished


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    current = getattr(m, leaf)
    if isinstance(current, nn.Parameter):
        current.data = value
    else:
        setattr(m, leaf, value)


def spread(n: int, resident: int) -> set[int]:
    """Which of n blocks stay resident: evenly spaced, so the copies of the streamed blocks overlap
    the compute of resident ones instead of queueing behind a run of streamed blocks."""
    resident = max(0, min(n, resident))
    return {int((k + 0.5) * n / resident) for k in range(resident)} if resident else set()


def _aligned(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a


class BlockStreamer:
    """Streams ``units`` (modules run in this order every forward) to ``device``.

    install() pins every weight in host memory (once), copies the resident ones to the device and hooks
    the modules; remove() unhooks and points every weight back at its pinned host copy (the device copies
    are dropped, nothing is copied back), so the model can be dropped or moved by its owner.
    """

    def __init__(self, units: Sequence[nn.Module], device: torch.device, resident: int, prefetch: int = 2) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.prefetch = max(1, int(prefetch))
        self.units: list[_Unit] = []
        keep = spread(len(units), resident)
        for i, m in enumerate(units):
            named = _tensors(m)
            nbytes = sum(_aligned(t.numel() * t.element_size()) for _, t in named)
            self.units.append(_Unit(m, [n for n, _ in named], [], nbytes, resident=i in keep))
        self.streamed = [u for u in self.units if not u.resident]
        self.n_slots = min(len(self.streamed), self.prefetch + 1)
        self.slot_bytes = max((u.nbytes for u in self.streamed), default=0)
        self.slots: list[torch.Tensor] = []
        self.slot_owner: list[Optional[_Unit]] = []
        self.slot_free: list[Optional[object]] = []  # event after which the slot may be overwritten
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._handles: list = []
        self._running: Optional[_Unit] = None
        self.bytes_copied = 0

    # ------------------------------------------------------------------ sizes

    @property
    def resident_bytes(self) -> int:
        return sum(u.nbytes for u in self.units if u.resident)

    @property
    def gpu_bytes(self) -> int:
        """Bytes this streamer keeps on the device: resident blocks plus the slot ring."""
        return self.resident_bytes + self.n_slots * self.slot_bytes

    # ------------------------------------------------------------------ install / remove

    def install(self) -> "BlockStreamer":
        pin = self.cuda
        for u in self.units:
            u.host = []
            for n, t in _tensors(u.module):
                h = t.detach().to("cpu")
                if pin and not h.is_pinned():
                    h = h.pin_memory()  # once: remove() leaves these pinned copies in place
                u.host.append(h)
                # resident: a device copy (fast from pinned memory); streamed: the host copy until its slot fills
                _set(u.module, n, h.to(self.device, non_blocking=True) if u.resident else h)
        self.slots = [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.n_slots)]
        self.slot_owner = [None] * self.n_slots
        self.slot_free = [None] * self.n_slots
        for u in self.streamed:
            self._handles.append(u.module.register_forward_pre_hook(self._make_hook(u)))
        return self

    def remove(self) -> None:
        self.finish()
        for h in self._handles:
            h.remove()
        self._handles = []
        for u in self.units:  # every weight back to its pinned host copy: nothing to copy back
            for n, h in zip(u.names, u.host):
                _set(u.module, n, h)
            u.slot, u.ready = None, None
        self.slots, self.slot_owner, self.slot_free = [], [], []

    def finish(self) -> None:
        """Mark the last streamed block of a forward as done (call after each forward)."""
        if self._running is not None and self._running.slot is not None:
            self.slot_free[self._running.slot] = self._record()
        self._running = None

    # ------------------------------------------------------------------ the schedule

    def _record(self) -> Optional[object]:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _free_slot(self, avoid: set[int]) -> Optional[int]:
        """A slot whose owner has finished computing (or none), never one in ``avoid``."""
        for s in range(self.n_slots):
            if s in avoid:
                continue
            owner = self.slot_owner[s]
            if owner is None or (owner is not self._running and self.slot_free[s] is not None):
                return s
        return None

    def _load(self, u: _Unit, slot: int) -> None:
        old = self.slot_owner[slot]
        if old is not None:
            old.slot, old.ready = None, None
        self.slot_owner[slot] = u
        u.slot = slot
        buf, off, views = self.slots[slot], 0, []
        for h in u.host:
            n = h.numel() * h.element_size()
            views.append(buf[off:off + n].view(h.dtype).view(h.shape))
            off += _aligned(n)
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                if self.slot_free[slot] is not None:
                    self.copy_stream.wait_event(self.slot_free[slot])
                for v, h in zip(views, u.host):
                    v.copy_(h, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
                u.ready = ev
        else:
            for v, h in zip(views, u.host):
                v.copy_(h)
            u.ready = True
        self.slot_free[slot] = None
        self.bytes_copied += u.nbytes
        u._views = views  # type: ignore[attr-defined]

    def _make_hook(self, u: _Unit):
        def hook(module, args):
            prev = self._running
            if prev is not None and prev.slot is not None:
                self.slot_free[prev.slot] = self._record()
            self._running = None
            if u.slot is None:
                slot = self._free_slot(avoid=set())
                if slot is None:  # every slot holds a block not run yet: take one that is not prev's
                    slot = next((s for s in range(self.n_slots) if self.slot_owner[s] is not prev), 0)
                self._load(u, slot)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(u.ready)
            for n, v in zip(u.names, u._views):  # type: ignore[attr-defined]
                _set(u.module, n, v)
            self._running = u
            self._prefetch_after(u)
        return hook

    def _prefetch_after(self, u: _Unit) -> None:
        i = self.streamed.index(u)
        for k in range(1, self.prefetch + 1):
            nxt = self.streamed[(i + k) % len(self.streamed)]
            if nxt is u or nxt.slot is not None:
                continue
            slot = self._free_slot(avoid={u.slot} if u.slot is not None else set())
            if slot is None:
                return
            self._load(nxt, slot)
