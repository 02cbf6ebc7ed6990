"""Opt-in regional ``torch.compile`` of the DiT: each transformer block's ``forward`` is compiled,
the model around the blocks (embedders, RoPE table, final layer) stays eager.

Why regional: all blocks share one Python ``Block.forward``, so dynamo compiles it once per distinct
input shape and reuses that graph for every block (parameters are graph inputs, not constants);
compiling the whole DiT would unroll 34 blocks into one graph and take minutes.

Shapes and recompiles. Two layouts:
- default (``cap_bucket=None``): the token dimension of every block input is marked dynamic
  (``torch._dynamo.maybe_mark_dynamic`` on the activations and the RoPE table, called eagerly just
  before the compiled forward), so one graph per block kind (context refiner, noise refiner, main
  blocks) serves every resolution and every caption length. The caption keeps ComfyUI's padding to a
  multiple of 32 and nothing is masked, so attention runs unmasked (cuDNN/flash) and the numerics are
  eager's up to inductor's fusion rounding. The batch dimension stays static (``mark_static``): each
  batch size compiles its own graphs once, so a batch-1 prompt runs the same graph whatever batch sizes
  ran before (after a batch of 2, automatic dynamic shapes would otherwise switch it to a dynamic-batch
  graph, whose kernels may round differently);
- ``cap_bucket=N`` (a multiple of 32): static shapes (``dynamic=False``), the caption padded to a
  multiple of N and the extra pads masked out of attention (RoPE positions stay ComfyUI's), so prompts
  of one bucket share a graph; each resolution and bucket compiles its own graphs. Kept for comparison:
  on an H200 the mask made attention ~7 ms per forward slower than the unmasked kernel
  (bench/dit_speed_lab.py);
- dynamo's per-function recompile limit (8 by default) would silently fall back to eager after a few
  shapes, so enabling raises it to ``RECOMPILE_LIMIT``.

Only ``forward`` is compiled (an instance attribute), not ``Module.__call__``: forward hooks such as
the block streamer's weight prefetch stay eager, and the state dict keeps the file's key names.
Nothing here runs unless ``enable`` is called (the sampler's ``compile`` input decides).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

RECOMPILE_LIMIT = 64
_MARK = "_zimage_compiled"


def blocks(dit: nn.Module) -> Iterator[nn.Module]:
    """Every transformer block of a ZImageDiT, in execution order."""
    yield from dit.context_refiner
    yield from dit.noise_refiner
    yield from dit.layers


def is_enabled(dit: nn.Module) -> bool:
    return bool(getattr(dit, _MARK, None))


def settings(dit: nn.Module) -> dict[str, Any] | None:
    """The options ``enable`` was called with, or None."""
    return getattr(dit, _MARK, None)


def enable(dit: nn.Module, *, cap_bucket: int | None = None, backend: str | Any = "inductor",
           mode: str | None = None, options: dict | None = None) -> None:
    """Compile every block's forward: token dimensions dynamic (default), or static shapes with the
    caption padded to ``cap_bucket`` tokens and masked (see the module docstring).

    Idempotent for the same settings; other settings recompile. ``backend`` may be any
    ``torch.compile`` backend (a callable too, which tests use to count compilations)."""
    wanted = {"cap_bucket": cap_bucket, "backend": backend, "mode": mode, "options": options}
    if settings(dit) == wanted:
        return
    disable(dit)
    if cap_bucket is not None and (cap_bucket < 1 or cap_bucket % 32):
        raise ValueError(f"cap_bucket must be a positive multiple of 32, not {cap_bucket}")
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    kwargs: dict[str, Any] = {"dynamic": False if cap_bucket else None, "backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    for block in blocks(dit):
        compiled = torch.compile(type(block).forward.__get__(block), **kwargs)
        block.forward = compiled if cap_bucket else _dynamic_tokens(compiled)
    dit.cap_bucket = cap_bucket
    setattr(dit, _MARK, wanted)


def _dynamic_tokens(compiled: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Mark the token dimension of a block's inputs dynamic, then call the compiled forward."""
    def forward(x: Tensor, freqs: Tensor, adaln: Tensor | None, mask: Tensor | None = None) -> Tensor:
        torch._dynamo.maybe_mark_dynamic(x, 1)
        torch._dynamo.maybe_mark_dynamic(freqs, 0)
        torch._dynamo.mark_static(x, 0)  # one graph per batch size: a batch of 2 run in between must not
        if adaln is not None:             # turn batch 1 into another (dynamic-batch) graph with other rounding
            torch._dynamo.mark_static(adaln, 0)
        return compiled(x, freqs, adaln, mask)
    return forward


def disable(dit: nn.Module) -> None:
    """Back to eager blocks and ComfyUI's caption padding (a multiple of 32)."""
    if not is_enabled(dit):
        return
    for block in blocks(dit):
        block.__dict__.pop("forward", None)
    dit.cap_bucket = None
    setattr(dit, _MARK, None)


def is_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from dynamo/inductor (e.g. no triton or no C++ compiler on this machine),
    as opposed to an error of the model itself."""
    try:
        from torch._dynamo.exc import TorchDynamoException
    except ImportError:  # pragma: no cover - every torch >= 2.0 has it
        return False
    return isinstance(exc, TorchDynamoException)


def describe_error(exc: BaseException) -> str:
    """One line naming what actually failed inside a dynamo/inductor error (for the report)."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    text = " ".join(str(inner).split())
    return f"{type(inner).__name__}: {text[:200]}" if text else type(inner).__name__
