"""GPU lab: where the DiT forward's time goes and what each speed option buys (one call, no files).

    python bench/dit_speed_lab.py [--out DIR] [--skip-compile] [--io-gb 12]

Full-size Z-Image DiT with random bf16 weights built on the GPU, 1024x1024, batch 1. Prints a table of
seconds per forward for: SDPA backends (auto, flash, cuDNN, efficient) with and without the caption-bucket
mask; fused w1|w3; a kernel-time breakdown (torch.profiler) of one eager forward; regional compile with
and without the mask; fp8 (e4m3, per-tensor scales, torch._scaled_mm) linears eager and compiled, with the
relative difference from bf16. Then a host-to-device read lab for the loader: a file in the page cache
read to the GPU by the current path (mmap + pageable copies) and by pread into pinned buffers with
1..16 threads.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from check_sampler_gpu import FULL, random_dit  # noqa: E402
from zimage_nodes.core import compile as dit_compile  # noqa: E402
from zimage_nodes.core.ops import CastLinear  # noqa: E402

ROWS: list[dict] = []


def timed(fn, repeat: int = 6) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def row(name: str, **kw) -> None:
    ROWS.append({"name": name, **kw})
    print(json.dumps(ROWS[-1]), flush=True)


def sdpa_ctx(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, backend)])


# ------------------------------------------------------------------ fp8 prototype

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


class Fp8Linear(torch.nn.Module):
    """Per-tensor scaled e4m3 weight, dynamic per-tensor activation scale, torch._scaled_mm."""

    def __init__(self, lin: torch.nn.Linear, fast_accum: bool = False) -> None:
        super().__init__()
        self.fast_accum = fast_accum
        w = lin.weight.detach()
        amax = w.abs().amax().float().clamp(min=1e-12)
        self.w_scale = (amax / FP8_MAX).reshape(())
        self.w = (w.float() / self.w_scale).to(FP8)
        self.bias = lin.bias
        self.out_features = w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        s = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        y = torch._scaled_mm(xq, self.w.t(), scale_a=s, scale_b=self.w_scale, bias=self.bias,
                             out_dtype=x.dtype, use_fast_accum=self.fast_accum)
        return y.reshape(*shp[:-1], self.out_features)


def to_fp8(model, fast_accum: bool = False) -> int:
    n = 0
    for block in dit_compile.blocks(model):
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, CastLinear):
                    setattr(parent, name, Fp8Linear(child, fast_accum))
                    n += 1
    return n


def fuse_w13(model) -> None:
    """w1|w3 as one GEMM (lab only: the forward of every FeedForward is replaced)."""
    for block in dit_compile.blocks(model):
        ff = block.feed_forward
        ff.w13 = torch.cat([ff.w1.weight, ff.w3.weight], 0)

        def fwd(x, ff=ff):
            a, b = F.linear(x, ff.w13).chunk(2, dim=-1)
            return ff.w2(F.silu(a) * b)
        ff.forward = fwd


def unfuse_w13(model) -> None:
    for block in dit_compile.blocks(model):
        block.feed_forward.__dict__.pop("forward", None)
        block.feed_forward.__dict__.pop("w13", None)


def profile_breakdown(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cats: dict[str, float] = {}
    top: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        n = e.name.lower()
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if any(k in n for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul")):
            c = "gemm"
        elif any(k in n for k in ("flash", "fmha", "attention", "cudnn", "sdpa")):
            c = "attention"
        else:
            c = "other"
        cats[c] = cats.get(c, 0.0) + us / 1e3
        top[e.name[:90]] = top.get(e.name[:90], 0.0) + us / 1e3
    best = sorted(top.items(), key=lambda kv: -kv[1])[:25]
    return {"ms_by_category": {k: round(v, 2) for k, v in cats.items()},
            "top_kernels_ms": [(k, round(v, 2)) for k, v in best]}


def compile_lab(args) -> None:
    """The default compile layout (dynamic token dims) against static shapes, its recompiles, a profile
    of the compiled forward, and fp8 with fast accumulation."""
    from torch._dynamo.utils import counters
    dev = "cuda"
    model = random_dit(FULL, dev, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 128, 128, generator=g).to(dev)
    noise2 = torch.randn(1, 16, 96, 168, generator=g).to(dev)  # 768x1344
    cap = (torch.randn(1, 256, FULL.cap_feat_dim, generator=g) * 3).to(dev, torch.bfloat16)
    sigma = torch.full((1,), 0.75, device=dev)
    with torch.inference_mode():
        ref = model(noise, sigma, cap[:, :128])
        row("eager cap128", s=timed(lambda: model(noise, sigma, cap[:, :128])))
        for label, kw in (("compile static nobucket", {"cap_bucket": 32}), ("compile dynamic tokens", {})):
            torch._dynamo.reset()
            counters.clear()
            dit_compile.enable(model, **kw)
            if kw:
                model.cap_bucket = None  # static shapes, ComfyUI's padding, no mask (recompiles per length)
            try:
                t0 = time.perf_counter()
                out = model(noise, sigma, cap[:, :128])
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t = timed(lambda: model(noise, sigma, cap[:, :128]))
                g1 = int(counters["stats"]["unique_graphs"])
                t0 = time.perf_counter()
                model(noise, sigma, cap[:, :77])
                model(noise, sigma, cap[:, :200])
                model(noise2, sigma, cap[:, :77])
                torch.cuda.synchronize()
                others = time.perf_counter() - t0
                row(label, s=t, first_call_s=first, rel_vs_eager=rel(out, ref), graphs_first=g1,
                    graphs_after_3_more_shapes=int(counters["stats"]["unique_graphs"]),
                    s_3_more_shapes=others,
                    s_768x1344=timed(lambda: model(noise2, sigma, cap[:, :77]), 3))
                if not kw:
                    row("profile compiled dynamic", wall_s=t,
                        **profile_breakdown(lambda: model(noise, sigma, cap[:, :128])))
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                            torch.profiler.ProfilerActivity.CPU]) as prof:
                        model(noise, sigma, cap[:, :128])
                        torch.cuda.synchronize()
                    if args.out:
                        args.out.mkdir(parents=True, exist_ok=True)
                        prof.export_chrome_trace(str(args.out / "compiled_trace.json"))
            except Exception as e:  # noqa: BLE001
                row(label, error=f"{type(e).__name__}: {str(e)[:300]}")
            dit_compile.disable(model)
        for fast in (False, True):
            m8 = random_dit(FULL, dev, torch.bfloat16) if False else model
            n = to_fp8(m8, fast) if not fast else None
            if fast:
                for block in dit_compile.blocks(model):
                    for parent in (block.attention, block.feed_forward):
                        for child in parent.children():
                            if isinstance(child, Fp8Linear):
                                child.fast_accum = True
            torch._dynamo.reset()
            dit_compile.enable(model)
            try:
                out = model(noise, sigma, cap[:, :128])
                t = timed(lambda: model(noise, sigma, cap[:, :128]))
                row(f"fp8 compile dynamic fast_accum={fast}", s=t, rel_vs_bf16=rel(out, ref), n=n)
                if fast:
                    row("profile fp8 fast compiled", wall_s=t,
                        **profile_breakdown(lambda: model(noise, sigma, cap[:, :128])))
            except Exception as e:  # noqa: BLE001
                row(f"fp8 compile fast_accum={fast}", error=f"{type(e).__name__}: {str(e)[:300]}")
            dit_compile.disable(model)
    del model
    torch.cuda.empty_cache()


def _pertensor_fp8_linear(x, weight, weight_scale, bias=None, fast_accum=True):
    """ops.fp8_linear with one activation scale for the whole tensor (its first version), for comparison."""
    from zimage_nodes.core.ops import E4M3, E4M3_MAX
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    xs = (x2.abs().amax().float() / E4M3_MAX).clamp_min(1e-12)
    xq = (x2.float() / xs).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale,
                         bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype, use_fast_accum=fast_accum)
    return y.reshape(*lead, weight.shape[0])


def fp8_lab(args) -> None:
    """The pack's fp8 path (ops.quantize_linears_fp8 with fp8 matmuls), compiled, with one activation scale
    per tensor against the pack's per-row scales; relative difference from bf16 and the loop time of 8
    forwards."""
    from zimage_nodes.core import ops, sampling, schedule
    dev = "cuda"
    model = random_dit(FULL, dev, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 128, 128, generator=g).to(dev)
    cap = (torch.randn(1, 128, FULL.cap_feat_dim, generator=g) * 3).to(dev, torch.bfloat16)
    sigma = torch.full((1,), 0.75, device=dev)
    sigmas = schedule.make_sigmas("turbo", 9)
    with torch.inference_mode():
        dit_compile.enable(model)
        ref = model(noise, sigma, cap)
        row("bf16 compiled", s=timed(lambda: model(noise, sigma, cap)),
            loop8_s=timed(lambda: sampling.sample(model, noise, sigmas, cap), 3))
        dit_compile.disable(model)
        n = ops.quantize_linears_fp8(model, fp8_matmul=True)
        orig = ops.fp8_linear
        for label, fn in (("per-tensor", _pertensor_fp8_linear), ("per-row", orig)):
            ops.fp8_linear = fn
            torch._dynamo.reset()
            dit_compile.enable(model)
            try:
                out = model(noise, sigma, cap)
                row(f"fp8 compiled act scale {label}", s=timed(lambda: model(noise, sigma, cap)),
                    loop8_s=timed(lambda: sampling.sample(model, noise, sigmas, cap), 3),
                    rel_vs_bf16=rel(out, ref), n=n)
                if label == "per-row":
                    row("profile fp8 per-row", **profile_breakdown(lambda: model(noise, sigma, cap)))
            except Exception as e:  # noqa: BLE001
                row(f"fp8 compiled {label}", error=f"{type(e).__name__}: {str(e)[:300]}")
            dit_compile.disable(model)
        ops.fp8_linear = orig
        row("fp8 eager per-row", s=timed(lambda: model(noise, sigma, cap)), rel_vs_bf16=rel(model(noise, sigma, cap), ref))
    del model
    torch.cuda.empty_cache()


class _Graphed:
    """One CUDA graph of a whole DiT forward for one input signature (lab prototype): static inputs are
    refilled and the graph replayed; the output is cloned so the next replay cannot overwrite it."""

    def __init__(self, model, x, sigma, cap) -> None:
        self.sx, self.ss, self.sc = x.clone(), sigma.clone(), cap.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(self.sx, self.ss, self.sc)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.graph(self.graph):
            self.out = model(self.sx, self.ss, self.sc)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0

    def __call__(self, x, sigma, cap):
        self.sx.copy_(x)
        self.ss.copy_(sigma)
        self.sc.copy_(cap)
        self.graph.replay()
        return self.out.clone()


def fuse_w13_module(model) -> None:
    """w1|w3 as one CastLinear ``w13`` (so fp8 quantizes its input once); lab only."""
    from zimage_nodes.core.ops import CastLinear as CL
    for block in dit_compile.blocks(model):
        ff = block.feed_forward
        w = torch.cat([ff.w1.weight, ff.w3.weight]).detach()
        lin = CL(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        ff.w13 = lin

        def fwd(x, ff=ff):
            a, b = ff.w13(x).chunk(2, dim=-1)
            return ff.w2(F.silu(a) * b)
        ff.forward = fwd


def fa3_probe() -> None:
    """FlashAttention-3 forward through the pack's own glue (core/attention.py: the module it finds, the per-head
    fp8 quantization it does) against SDPA at one 1024x1024 forward's attention (30 heads x 4224 tokens x 128):
    time and relative error, bf16 and fp8 e4m3."""
    from zimage_nodes.core import attention as attn
    mod = attn._module("fa3")
    if mod is None:  # say why each candidate did not import
        for name in attn._PACKAGES["fa3"]:
            try:
                __import__(name)
            except Exception as e:  # noqa: BLE001
                row(f"fa3 import {name}", error=f"{type(e).__name__}: {str(e)[:300]}")
        return
    row("fa3 module", name=mod.__name__)
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(1, 4224, 30, 128, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    k = k * 2.0
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    sdpa = timed(lambda: F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))), 20)
    try:
        out = attn._first(mod.flash_attn_func(q, k, v))
        row("fa3 bf16", s=timed(lambda: mod.flash_attn_func(q, k, v), 20), sdpa_s=sdpa, rel_vs_sdpa=rel(out, ref))
    except Exception as e:  # noqa: BLE001
        row("fa3 bf16", error=f"{type(e).__name__}: {str(e)[:300]}")
    try:
        (q8, sq), (k8, sk), (v8, sv) = (attn._quantize_heads(t) for t in (q, k, v))
        out = attn._first(mod.flash_attn_func(q8, k8, v8, q_descale=sq, k_descale=sk, v_descale=sv))
        row("fa3 fp8", s=timed(lambda: mod.flash_attn_func(q8, k8, v8, q_descale=sq, k_descale=sk, v_descale=sv), 20),
            sdpa_s=sdpa, rel_vs_sdpa=rel(out, ref), out_dtype=str(out.dtype),
            quant_s=timed(lambda: [attn._quantize_heads(t) for t in (q, k, v)], 20))
    except Exception as e:  # noqa: BLE001
        row("fa3 fp8", error=f"{type(e).__name__}: {str(e)[:300]}")


def graph_lab(args) -> None:
    """Loop time of 8 compiled forwards, plain and replayed from a whole-forward CUDA graph, in bf16 and
    fp8 matmuls, with w1|w3 separate and fused; batch-4 throughput; whether SDPA takes fp8 inputs."""
    import re
    from zimage_nodes.core import ops, sampling, schedule
    dev = "cuda"
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 128, 128, generator=g).to(dev)
    cap = (torch.randn(1, 128, FULL.cap_feat_dim, generator=g) * 3).to(dev, torch.bfloat16)
    sigmas = schedule.make_sigmas("turbo", 9)
    q = torch.randn(1, 30, 4224, 128, device=dev, dtype=torch.bfloat16)
    with torch.inference_mode():
        fa3_probe()
        row("sdpa bf16 30x4224x128", s=timed(lambda: F.scaled_dot_product_attention(q, q, q), 20))
        try:
            q8 = q.to(torch.float8_e4m3fn)
            row("sdpa fp8 30x4224x128", s=timed(lambda: F.scaled_dot_product_attention(q8, q8, q8), 20))
        except Exception as e:  # noqa: BLE001
            row("sdpa fp8 30x4224x128", error=f"{type(e).__name__}: {str(e)[:200]}")
        ref = None
        for fp8 in (False, True):
            for fused in (False, True):
                model = random_dit(FULL, dev, torch.bfloat16)
                if fused:
                    fuse_w13_module(model)
                if fp8:
                    ops.quantize_linears_fp8(model, fp8_matmul=True, matmul_names=re.compile(
                        r"(?:^|\.)(?:noise_refiner|context_refiner|layers)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w(?:13|[123]))$"))
                torch._dynamo.reset()
                dit_compile.enable(model)
                label = ("fp8" if fp8 else "bf16") + (" w13 fused" if fused else "")
                try:
                    out = model(noise, sigmas[:1].to(dev), cap)
                    if ref is None:
                        ref = out
                    plain = timed(lambda: sampling.sample(model, noise, sigmas, cap), 3)
                    gr = _Graphed(model, noise, sigmas[:1].to(dev), cap)
                    graphed = timed(lambda: sampling.sample(gr, noise, sigmas, cap), 3)
                    extra = {}
                    if not fp8 and not fused:
                        n4 = noise.expand(4, -1, -1, -1).contiguous()
                        b4 = timed(lambda: sampling.sample(model, n4, sigmas, cap), 2)
                        extra = {"loop8_batch4_s": b4, "batch4_throughput_x": 4 * plain / b4}
                    row(f"graph lab {label}", loop8_s=plain, s=plain / 8, graphed_loop8_s=graphed,
                        graphed_s_per_forward=graphed / 8, capture_s=gr.capture_s,
                        rel_vs_bf16=rel(out, ref), **extra)
                    if fp8:
                        row(f"profile {label}", **profile_breakdown(lambda: gr(noise, sigmas[:1].to(dev), cap)))
                    del gr
                except Exception as e:  # noqa: BLE001
                    row(f"graph lab {label}", error=f"{type(e).__name__}: {str(e)[:300]}")
                dit_compile.disable(model)
                del model
                torch.cuda.empty_cache()


def _time_compiled(label: str, model, noise, sigma, cap, bucket, backend, ref=None) -> None:
    """Compile the blocks (static shapes; ``bucket`` None = ComfyUI's padding, no mask), time a forward."""
    torch._dynamo.reset()
    dit_compile.enable(model, cap_bucket=128)
    model.cap_bucket = bucket
    try:
        with sdpa_ctx(backend):
            t0 = time.perf_counter()
            out = model(noise, sigma, cap)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t = timed(lambda: model(noise, sigma, cap))
        extra = {} if ref is None else {"rel_vs_bf16": rel(out, ref)}
        row(label, s=t, first_call_s=first, **extra)
    except Exception as e:  # noqa: BLE001
        row(label, error=f"{type(e).__name__}: {str(e)[:300]}")
    dit_compile.disable(model)


def dit_lab(args) -> None:
    dev = "cuda"
    model = random_dit(FULL, dev, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, 128, 128, generator=g).to(dev)
    cap128 = (torch.randn(1, 128, FULL.cap_feat_dim, generator=g) * 3).to(dev, torch.bfloat16)
    cap77 = cap128[:, :77].contiguous()
    sigma = torch.full((1,), 0.75, device=dev)
    with torch.inference_mode():
        ref = model(noise, sigma, cap128)
        for backend in (None, "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_ctx(backend):
                    t = timed(lambda: model(noise, sigma, cap128))
                    out = model(noise, sigma, cap128)
                row(f"eager cap128 sdpa={backend or 'auto'}", s=t, rel_vs_auto=rel(out, ref))
            except Exception as e:  # noqa: BLE001
                row(f"eager cap128 sdpa={backend}", error=f"{type(e).__name__}: {str(e)[:200]}")
        model.cap_bucket = 128
        for backend in (None, "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with sdpa_ctx(backend):
                    t = timed(lambda: model(noise, sigma, cap77))
                row(f"eager cap77 bucket128 mask sdpa={backend or 'auto'}", s=t)
            except Exception as e:  # noqa: BLE001
                row(f"eager cap77 bucket128 mask sdpa={backend}", error=f"{type(e).__name__}: {str(e)[:200]}")
        model.cap_bucket = None
        row("profile eager cap128 auto", **profile_breakdown(lambda: model(noise, sigma, cap128)))
        with sdpa_ctx("CUDNN_ATTENTION"):
            try:
                row("profile eager cap128 cudnn", **profile_breakdown(lambda: model(noise, sigma, cap128)))
            except Exception as e:  # noqa: BLE001
                row("profile cudnn", error=str(e)[:200])
        fuse_w13(model)
        row("eager cap128 fused w1|w3", s=timed(lambda: model(noise, sigma, cap128)),
            rel_vs_auto=rel(model(noise, sigma, cap128), ref))
        unfuse_w13(model)

        if not args.skip_compile:
            for label, bucket, backend in (("compile bucket128 mask auto", 128, None),
                                           ("compile bucket128 mask cudnn", 128, "CUDNN_ATTENTION"),
                                           ("compile nobucket cudnn", None, "CUDNN_ATTENTION")):
                _time_compiled(label, model, noise, sigma, cap77 if bucket else cap128, bucket, backend)

        n = to_fp8(model)
        for backend in (None, "CUDNN_ATTENTION"):
            with sdpa_ctx(backend):
                t = timed(lambda: model(noise, sigma, cap128))
                out = model(noise, sigma, cap128)
            row(f"fp8 eager sdpa={backend or 'auto'} ({n} linears)", s=t, rel_vs_bf16=rel(out, ref))
        if not args.skip_compile:
            _time_compiled("fp8 compile nobucket cudnn", model, noise, sigma, cap128, None, "CUDNN_ATTENTION", ref)
        # GEMM microbench: the main-block shapes at M = 4224 tokens
        M = 4224
        for nm, (N, K) in {"qkv": (11520, 3840), "out": (3840, 3840), "w1|w3": (20480, 3840),
                           "w1": (10240, 3840), "w2": (3840, 10240)}.items():
            a = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K ** -0.5
            tb = timed(lambda: F.linear(a, w), 20)
            aq, wq = a.to(FP8), w.to(FP8)
            one = torch.ones((), device=dev)
            tf = timed(lambda: torch._scaled_mm(aq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 20)
            fl = 2 * M * N * K
            row(f"gemm {nm} M{M} N{N} K{K}", bf16_ms=tb * 1e3, bf16_tflops=fl / tb / 1e12,
                fp8_ms=tf * 1e3, fp8_tflops=fl / tf / 1e12)
    del model
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ loader I/O lab

def io_lab(args) -> None:
    import mmap
    path = Path(args.io_path)
    size = int(args.io_gb * 2 ** 30)
    if not path.exists() or path.stat().st_size != size:
        t0 = time.time()
        blk = torch.randint(0, 256, (2 ** 30,), dtype=torch.uint8).numpy().tobytes()
        with open(path, "wb") as f:
            for _ in range(size // 2 ** 30):
                f.write(blk)
        row("io write file", s=time.time() - t0, gb=size / 2 ** 30)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    # warm the page cache
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass

    def pageable_mmap() -> None:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            step = 256 << 20
            for o in range(0, size, step):
                dst[o:o + step].copy_(t[o:o + step])
            torch.cuda.synchronize()
            del t
            mm.close()

    def pinned_threads(n_threads: int, chunk: int, bufs_per_thread: int = 2) -> None:
        fd = os.open(path, os.O_RDONLY)
        chunks = list(range(0, size, chunk))
        lock = threading.Lock()
        nxt = [0]

        def worker() -> None:
            stream = torch.cuda.Stream()
            pins = [torch.empty(chunk, dtype=torch.uint8).pin_memory() for _ in range(bufs_per_thread)]
            views = [memoryview(p.numpy()) for p in pins]
            evs: list = [None] * bufs_per_thread
            i = 0
            while True:
                with lock:
                    if nxt[0] >= len(chunks):
                        break
                    off = chunks[nxt[0]]
                    nxt[0] += 1
                k = i % bufs_per_thread
                if evs[k] is not None:
                    evs[k].synchronize()
                n = min(chunk, size - off)
                got = os.preadv(fd, [views[k][:n]], off)
                assert got == n
                with torch.cuda.stream(stream):
                    dst[off:off + n].copy_(pins[k][:n], non_blocking=True)
                    evs[k] = torch.cuda.Event()
                    evs[k].record(stream)
                i += 1
            stream.synchronize()

        ths = [threading.Thread(target=worker) for _ in range(n_threads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        os.close(fd)
        torch.cuda.synchronize()

    def register_mmap(chunk: int) -> None:
        cudart = torch.cuda.cudart()
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            t = torch.frombuffer(mm, dtype=torch.uint8)
            ptr = t.data_ptr()
            regs = []
            for o in range(0, size, chunk):
                n = min(chunk, size - o)
                err = cudart.cudaHostRegister(ptr + o, n, 8)  # cudaHostRegisterReadOnly
                if int(err) != 0:
                    raise RuntimeError(f"cudaHostRegister: {err}")
                regs.append(ptr + o)
                dst[o:o + n].copy_(t[o:o + n], non_blocking=True)
            torch.cuda.synchronize()
            for p in regs:
                cudart.cudaHostUnregister(p)
            del t
            mm.close()

    tests = [("io pageable mmap 256MB", pageable_mmap)]
    for n in (1, 2, 4, 8, 12, 16):
        tests.append((f"io pread pinned threads={n} chunk=64MB", lambda n=n: pinned_threads(n, 64 << 20)))
    tests.append(("io pread pinned threads=8 chunk=16MB", lambda: pinned_threads(8, 16 << 20, 3)))
    tests.append(("io pread pinned threads=8 chunk=256MB", lambda: pinned_threads(8, 256 << 20)))
    tests.append(("io cudaHostRegister(mmap) 256MB", lambda: register_mmap(256 << 20)))
    ref = None
    for name, fn in tests:
        try:
            dst.zero_()
            best = None
            for _ in range(2):
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                best = dt if best is None else min(best, dt)
            chk = int(dst[:: 1 << 20].sum().item())
            ref = chk if ref is None else ref
            row(name, s=best, gbps=size / best / 1e9, checksum_ok=chk == ref)
        except Exception as e:  # noqa: BLE001
            row(name, error=f"{type(e).__name__}: {str(e)[:200]}")
    # pinned buffer allocation cost (what a staging ring costs to create)
    t0 = time.perf_counter()
    torch.empty(512 << 20, dtype=torch.uint8).pin_memory()
    row("io pin 512MB", s=time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-dit", action="store_true")
    ap.add_argument("--compile-lab", action="store_true", help="only the compile/fp8 section (no I/O)")
    ap.add_argument("--fp8-lab", action="store_true", help="only the pack's fp8 path (no I/O)")
    ap.add_argument("--fa3-probe", action="store_true", help="only FlashAttention-3 (bf16, fp8) against SDPA")
    ap.add_argument("--graph-lab", action="store_true",
                    help="only CUDA graphs / fused w1|w3 / batch 4 / fp8 SDPA probe (no I/O)")
    ap.add_argument("--io-gb", type=float, default=12.0)
    ap.add_argument("--io-path", default="/tmp/io_lab.bin")
    args = ap.parse_args()
    row("device", gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cpus=os.cpu_count())
    if args.fa3_probe:
        with torch.inference_mode():
            fa3_probe()
    elif args.graph_lab:
        graph_lab(args)
    elif args.fp8_lab:
        fp8_lab(args)
    elif args.compile_lab:
        compile_lab(args)
    elif not args.skip_dit:
        dit_lab(args)
    if args.io_gb > 0 and not (args.compile_lab or args.fp8_lab or args.graph_lab or args.fa3_probe):
        io_lab(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dit_speed_lab.json").write_text(json.dumps(ROWS, indent=1))
    for r in ROWS:
        if "s" in r or "error" in r:
            print(f"{r['name']:<55} {r.get('s', r.get('error'))}")


if __name__ == "__main__":
    main()
