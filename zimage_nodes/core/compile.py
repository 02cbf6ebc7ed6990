"""Opt-in regional ``torch.compile`` of the DiT: each transformer block's ``forward`` is compiled,
the model around the blocks (embedders, RoPE table, final layer) stays eager.

Why regional: all blocks share one Python ``Block.forward``, so dynamo compiles it once per distinct
input shape and reuses that graph for every block (parameters are graph inputs, not constants);
compiling the whole DiT would unroll 34 blocks into one graph and take minutes.

Shapes and recompiles (``dynamic=False``, so each new shape compiles once and is then cached):
- one graph for the context refiner (caption only, no modulation), one for the noise refiner
  (image tokens), one for the main blocks ([caption, image]): three per (batch, resolution,
  caption bucket);
- the caption is padded to a multiple of ``cap_bucket`` (``ZImageDiT.cap_bucket``, default 128)
  instead of ComfyUI's 32, so prompts of 20 and 100 tokens share a graph. The pad tokens beyond
  ComfyUI's 32-multiple are masked out of attention and the RoPE positions stay ComfyUI's, so the
  image is the same as without compile up to rounding (fp32: identical on the CPU; bf16 on an H200:
  compiled vs eager differ by ~2e-2 of the max, as inductor's fusions round differently). The mask
  makes attention run as masked SDPA (no flash kernel): ~6 % slower per eager forward on an H200,
  and compiled forwards were still ~14 % faster than eager ones (bench/check_sampler_gpu.py,
  bench/results/h200_sampler_gpu.json, random weights);
- dynamo's per-function recompile limit (8 by default) would be reached after two or three
  resolutions and then silently fall back to eager, so enabling raises it to ``RECOMPILE_LIMIT``.

Only ``forward`` is compiled (an instance attribute), not ``Module.__call__``: forward hooks such as
the block streamer's weight prefetch stay eager, and the state dict keeps the file's key names.
Nothing here runs unless ``enable`` is called; the pack never compiles by default.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

DEFAULT_BUCKET = 128
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


def enable(dit: nn.Module, *, cap_bucket: int = DEFAULT_BUCKET, backend: str | Any = "inductor",
           mode: str | None = None, options: dict | None = None) -> None:
    """Compile every block's forward (``dynamic=False``) and pad captions to ``cap_bucket`` tokens.

    Idempotent for the same settings; other settings recompile. ``backend`` may be any
    ``torch.compile`` backend (a callable too, which tests use to count compilations)."""
    wanted = {"cap_bucket": cap_bucket, "backend": backend, "mode": mode, "options": options}
    if settings(dit) == wanted:
        return
    disable(dit)
    if cap_bucket < 1 or cap_bucket % 32:
        raise ValueError(f"cap_bucket must be a positive multiple of 32, not {cap_bucket}")
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
    kwargs: dict[str, Any] = {"dynamic": False, "backend": backend}
    if mode is not None:
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    for block in blocks(dit):
        block.forward = torch.compile(type(block).forward.__get__(block), **kwargs)
    dit.cap_bucket = cap_bucket
    setattr(dit, _MARK, wanted)


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
