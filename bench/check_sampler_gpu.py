"""GPU check of the sampler loop and the opt-in regional compile (core/sampling.py, core/compile.py).

    python bench/check_sampler_gpu.py [--size 1024] [--out bench/results/sampler_gpu.json]

Full-size Z-Image DiT with random bf16 weights built on the GPU (no files), 8 Turbo forwards:
1. no host synchronisation inside the loop: the whole sampling.sample call runs under
   torch.cuda.set_sync_debug_mode("error") (after one warm-up forward that fills the RoPE cache);
2. eager time per forward with ComfyUI's caption padding and with the 128-token bucket (masked SDPA);
3. inductor compile of the blocks: first-call time, then two caption lengths of one bucket must add no
   graph (torch._dynamo counters), a third length in another bucket adds the caption-shaped graphs;
   compiled vs eager output (bf16) and time per forward.
Needs only torch (+ triton for inductor); diffusers is not used (the Turbo sigmas are computed here).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zimage_nodes.core import compile as dit_compile  # noqa: E402
from zimage_nodes.core import sampling  # noqa: E402
from zimage_nodes.core.dit import DiTConfig, ZImageDiT  # noqa: E402
from zimage_nodes.core.schedule import shift_sigma  # noqa: E402

FULL = DiTConfig(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, ffn_hidden=10240, cap_feat_dim=2560)


def turbo_sigmas(forwards: int = 8, shift: float = 3.0) -> torch.Tensor:
    s = shift_sigma(torch.linspace(1.0, 1.0 / forwards, forwards, dtype=torch.float64), shift)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def random_dit(cfg: DiTConfig, device: str, dtype: torch.dtype) -> ZImageDiT:
    torch.manual_seed(0)
    model = ZImageDiT(cfg, device=device, dtype=dtype).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "pad_token" not in name:
            p.normal_(0.0, p.shape[1] ** -0.5)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02)
        elif "pad_token" in name:
            p.normal_(0.0, 1.0)
        else:
            p.normal_(1.0, 0.02)
    return model


def timed(fn, repeat: int = 5) -> tuple[object, float]:
    """(last result, median seconds) with CUDA events."""
    times, out = [], None
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    return out, statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    dev, dtype = "cuda", torch.bfloat16
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "size": args.size}
    model = random_dit(FULL, dev, dtype)
    lat = args.size // 8
    g = torch.Generator(device="cpu").manual_seed(1)
    noise = torch.randn(1, 16, lat, lat, generator=g).to(dev)
    caps = {n: (torch.randn(1, n, FULL.cap_feat_dim, generator=g) * 3).to(dev, dtype) for n in (100, 120, 200)}
    sigmas = turbo_sigmas()
    sigma = torch.full((1,), 0.75, device=dev)

    with torch.inference_mode():
        model(noise, sigma, caps[100])  # warm-up: kernels, RoPE table
        torch.cuda.synchronize()
        steps: list[int] = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = sampling.sample(model, noise, sigmas, caps[100], callback=lambda st: steps.append(st.index))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        res["loop_without_host_sync"] = steps == list(range(8)) and bool(torch.isfinite(out).all())
        res["finite_latent_std"] = float(out.float().std())

        eager, t_eager = timed(lambda: model(noise, sigma, caps[100]))
        res["eager_forward_s"] = t_eager
        model.cap_bucket = 128
        bucketed, t_bucket = timed(lambda: model(noise, sigma, caps[100]))
        model.cap_bucket = None
        res["eager_bucket128_forward_s"] = t_bucket
        res["bucket128_vs_padding32_rel"] = rel(bucketed, eager)
        _, t_loop = timed(lambda: sampling.sample(model, noise, sigmas, caps[100]), repeat=3)
        res["eager_8_forwards_s"] = t_loop

        if not args.no_compile:
            torch._dynamo.reset()
            dit_compile.enable(model, cap_bucket=128)
            t0 = time.perf_counter()
            compiled = model(noise, sigma, caps[100])
            torch.cuda.synchronize()
            res["compile_first_call_s"] = time.perf_counter() - t0
            res["graphs_after_first"] = graphs()
            res["compiled_vs_eager_rel"] = rel(compiled, eager)
            model(noise, sigma, caps[120])
            res["graphs_after_same_bucket"] = graphs()
            t0 = time.perf_counter()
            model(noise, sigma, caps[200])
            torch.cuda.synchronize()
            res["next_bucket_compile_s"] = time.perf_counter() - t0
            res["graphs_after_next_bucket"] = graphs()
            _, res["compiled_forward_s"] = timed(lambda: model(noise, sigma, caps[100]))
            _, res["compiled_8_forwards_s"] = timed(lambda: sampling.sample(model, noise, sigmas, caps[100]), repeat=3)
            torch.cuda.set_sync_debug_mode("error")
            try:
                sampling.sample(model, noise, sigmas, caps[120])
                res["compiled_loop_without_host_sync"] = True
            except RuntimeError as e:
                res["compiled_loop_without_host_sync"] = f"{type(e).__name__}: {str(e)[:200]}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            res["graphs_at_end"] = graphs()
            dit_compile.disable(model)
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    res["tflops_eager"] = 56.6e12 * (args.size / 1024) ** 2 / res["eager_forward_s"] / 1e12 \
        if args.size == 1024 else math.nan
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
