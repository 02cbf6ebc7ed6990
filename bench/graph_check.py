"""Quick GPU check of the sampler's CUDA graphs (core/graphs.py) on the full-size DiT with random weights in
memory (no files): the compiled blocks' 8-forward Turbo loop, plain and through StepGraphs, 1024x1024 and a
128-token caption; the largest difference of the two latents (must be 0) and the time of each loop (median of 3
after a warm-up, CUDA events).

    python bench/graph_check.py [--out graph_check.json]
    python bench/graph_check.py --device cpu --scale tiny   # smoke run (tests): no graphs on the CPU, numbers mean nothing
    python bench/graph_check.py --fp8 --options '{"triton.multi_kernel": 1, "coordinate_descent_tuning": true}'
    python bench/graph_check.py --fp8 --attention fa3 --fp8-attention   # FA3's fp8 forward (needs FA3 installed)

--fp8 converts the block linears to fp8 weights with fp8 matmuls first (the policy's fp8_fast); --options passes
inductor options to the blocks' torch.compile (core/compile.enable), e.g. multi_kernel, which also generates
one-pass (persistent) variants of the row reductions that quantize activations and picks the faster at run time.
--attention picks the blocks' attention backend (core/attention.py; a missing one falls back to SDPA and the
result says so); --fp8-attention runs FA3's fp8 forward in every block (ZImageDiT.set_fp8_attention; needs
--attention fa3), and the result adds how far its loop's latent is from the same loop with bf16 attention.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_pipeline import cuda_time as timed  # noqa: E402
from check_sampler_gpu import FULL, random_dit  # noqa: E402
from zimage_nodes.core.dit import DiTConfig  # noqa: E402
from zimage_nodes.core import compile as dit_compile, ops, sampling, schedule  # noqa: E402
from zimage_nodes.core.graphs import StepGraphs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a smoke run")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full",
                    help="tiny: a 2+2+2-block DiT of width 256 at 256x256, compiled with the eager backend (smoke run)")
    ap.add_argument("--fp8", action="store_true", help="fp8 weights and fp8 matmuls in the blocks (fp8_fast)")
    ap.add_argument("--options", type=json.loads, default=None, help="inductor options (JSON) for the blocks")
    ap.add_argument("--attention", default="sdpa", help="attention backend of the blocks (sdpa, fa3, ...)")
    ap.add_argument("--fp8-attention", action="store_true", help="FA3's fp8 attention forward (with --attention fa3)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = FULL if args.scale == "full" else DiTConfig(dim=256, n_layers=2, n_refiner_layers=2, n_heads=2,
                                                      ffn_hidden=768, cap_feat_dim=64, t_hidden=256)
    side = 128 if args.scale == "full" else 32
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 16, side, side, generator=g).to(dev)
    cap = (torch.randn(1, 128, cfg.cap_feat_dim, generator=g) * 3).to(dev, torch.bfloat16)
    sigmas = schedule.make_sigmas("turbo", 9)
    model = random_dit(cfg, str(dev), torch.bfloat16)
    if args.fp8:
        ops.quantize_linears_fp8(model, fp8_matmul=True)
    res: dict = {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (cpu)",
                 "torch": torch.__version__, "scale": args.scale, "fp8": args.fp8, "options": args.options,
                 "allocator": torch.cuda.get_allocator_backend() if dev.type == "cuda" else "none",
                 "attention": args.attention, "attention_note": model.set_attention_backend(args.attention)}
    if args.fp8_attention:
        res["fp8_attention"] = model.set_fp8_attention(True)
        if res["fp8_attention"]:  # the reference: the same plain loop with bf16 attention (eager: no compile)
            model.set_fp8_attention(False)
            with torch.inference_mode():
                bf16_attn = sampling.sample(model, noise, sigmas, cap)
            model.set_fp8_attention(True)
    dit_compile.enable(model, backend="inductor" if args.scale == "full" else "eager", options=args.options)
    with torch.inference_mode():
        plain_t, graph_t, errors = [], [], []
        plain = replayed = None
        for _ in range(4):  # the first round compiles and warms up
            plain, t = timed(lambda: sampling.sample(model, noise, sigmas, cap))
            plain_t.append(t)
            sg = StepGraphs(model)
            replayed, t = timed(lambda: sampling.sample(sg, noise, sigmas, cap))
            graph_t.append(t)
            errors.append(sg.error)
            res["replays"] = sg.replays
            sg.close()
        res.update(plain_loop8_s=statistics.median(plain_t[1:]), graph_loop8_s=statistics.median(graph_t[1:]),
                   plain_all_s=plain_t, graph_all_s=graph_t, errors=errors,
                   max_abs_diff=float((plain - replayed).abs().max()),
                   peak_gb=torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None)
        if res.get("fp8_attention"):  # eager bf16-attention loop against the compiled fp8-attention one
            res["vs_bf16_attention_mean_abs"] = float((plain.float() - bf16_attn.float()).abs().mean())
            res["vs_bf16_attention_rel_l2"] = float((plain.float() - bf16_attn.float()).norm() / bf16_attn.float().norm())
    res["plain_ms_per_forward"] = res["plain_loop8_s"] / 8 * 1000
    res["graph_ms_per_forward"] = res["graph_loop8_s"] / 8 * 1000
    print("RESULT " + json.dumps(res), flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
