"""GPU benchmark of the tiled upscaler (ZImageTiledUpscale): peak VRAM and time per tile for 2048^2 and
4096^2 outputs, and a plain img2img of one tile of the same size for the tiling overhead.

    python bench/bench_upscale.py --weights /tmp/zimage_w [--sizes 2048,4096] [--blends feather,latent] \
        [--tile 1024 --overlap 128 --denoise 0.3 --steps 9] [--out bench/results/UPSCALE.md]

Writes full-size random-weight checkpoints in the real single-file layouts once into --weights (the same
folder layout as bench_pipeline.py, so both can share it), then runs in this process through the pack's
own code path with ComfyUI's model management (in-process ComfyUI, GPU): runtime.load_model (the
text encoder is never loaded: a random 128-token caption embedding stands in), upscaler.upscale for
each output size and blend mode (input = output / 2, Lanczos upscale), and runtime.sample as a plain
img2img (denoise 0.3, same steps) of one tile of the size the layout uses.

Targets (docs): peak VRAM at 4096^2 within 10% of 2048^2 (it must not grow with the output size) and
time per tile at most 10% above a plain img2img of that tile size. Peaks are torch.cuda
max_memory_allocated (resident weights included) and the same above what was allocated before the run.
Output: a markdown table on stdout (and --out).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1024 ** 3
CAP_TOKENS = 128


def generate(root: Path) -> None:
    from zimage_nodes.testing import weights
    t = time.time()
    weights.ensure_single_files(root / "models")
    print(f"[bench] full-size weights ready in {time.time() - t:.0f}s", flush=True)


def smooth_image(size: int, seed: int = 0):
    """A smooth random IMAGE [1,size,size,3] (upscaling noise would be an odd input)."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, max(1, size // 16), max(1, size // 16), generator=g)
    return F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1).movedim(1, -1)


class Measure:
    """Wall time (CUDA synchronised) and peak allocated bytes of one call."""

    def __init__(self) -> None:
        import torch
        self.torch = torch

    def __call__(self, fn):
        torch = self.torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t, torch.cuda.max_memory_allocated(), before


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, required=True, help="folder for (or with) the full-size random weights")
    ap.add_argument("--sizes", default="2048,4096")
    ap.add_argument("--blends", default="feather,latent")
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--denoise", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--runs", type=int, default=3, help="plain img2img repetitions (median)")
    ap.add_argument("--warmup-size", type=int, default=1024, help="output size of the warm-up upscales")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_upscale.py needs a CUDA GPU")
    generate(args.weights)
    from zimage_nodes.testing.comfy import ensure_comfy_importable
    ensure_comfy_importable(args.weights)   # base directory = --weights, so models/ is found there
    from zimage_nodes import comfy_bridge as bridge
    from zimage_nodes import runtime, upscaler
    from zimage_nodes.core.tiling import TileLayout

    t = time.time()
    model, report = runtime.load_model("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors",
                                       "none", "auto", "auto", "auto", "auto", "auto", "auto")
    print(f"[bench] loaded in {time.time() - t:.1f}s: {report}", flush=True)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, CAP_TOKENS, model.cap_feat_dim, generator=g).to(bridge.intermediate_device())
    cond = runtime.ZImageConditioning(embeds, "bench", CAP_TOKENS, False, "bench")
    measure = Measure()

    def upscale(size: int, blend: str):
        image = smooth_image(size // 2)
        return upscaler.upscale(model, image, cond, 2.0, size, size, args.tile, args.overlap, args.denoise,
                                args.steps, 0, blend)

    def img2img(tile: int):
        image = smooth_image(tile, seed=2)
        return runtime.sample(model, cond, tile, tile, 0, args.steps, "turbo", 3.0, 1.0, 1, 0, args.denoise,
                              image=image)

    print("[bench] warm-up", flush=True)
    for blend in ("feather", "latent"):
        upscale(args.warmup_size, blend)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    blends = [b for b in args.blends.split(",") if b]
    plain: dict[int, tuple[float, int, int]] = {}
    for size in sizes:
        tile = TileLayout(size, size, args.tile, args.overlap).tile_w
        if tile not in plain:
            img2img(tile)   # warm-up at this shape
            times, peak, before = [], 0, 0
            for _ in range(args.runs):
                _, dt, pk, bf = measure(lambda: img2img(tile))
                times.append(dt)
                peak, before = max(peak, pk), bf
            plain[tile] = (statistics.median(times), peak, before)
            print(f"[bench] plain img2img {tile}^2: {plain[tile][0]:.3f}s, peak {peak / GB:.2f} GB", flush=True)

    rows, peaks = [], {}
    for size in sizes:
        layout = TileLayout(size, size, args.tile, args.overlap)
        lz = time.perf_counter()
        upscaler.lanczos(smooth_image(size // 2), size, size)
        lanczos_s = time.perf_counter() - lz
        for blend in blends:
            (_, text), dt, peak, before = measure(lambda: upscale(size, blend))
            per_tile = (dt - lanczos_s) / len(layout)
            p_time, p_peak, p_before = plain[layout.tile_w]
            peaks[(size, blend)] = (peak, peak - before)
            rows.append(f"| {size}x{size} | {blend} | {len(layout)} | {layout.tile_w} | {dt:.2f} | {lanczos_s:.2f} | "
                        f"{per_tile:.3f} | {p_time:.3f} | {100 * (per_tile / p_time - 1):+.1f}% | "
                        f"{peak / GB:.2f} ({(peak - before) / GB:.2f}) | "
                        f"{p_peak / GB:.2f} ({(p_peak - p_before) / GB:.2f}) |")
            print(f"[bench] {size} {blend}: {dt:.2f}s; {text.splitlines()[1]}", flush=True)

    gpu = torch.cuda.get_device_name(0)
    lines = [f"## Tiled upscale, {gpu}, tile {args.tile} / overlap {args.overlap}, denoise {args.denoise}, "
             f"steps {args.steps}, bf16 DiT, random full-size weights", "",
             "| output | blend | tiles | tile px | total s | Lanczos s (CPU) | s/tile | plain img2img s (same tile) | "
             "tiling overhead | peak GB (above resident) | plain img2img peak GB (above resident) |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    if len(sizes) >= 2:
        lo, hi = min(sizes), max(sizes)
        for blend in blends:
            (a, a_run), (b, b_run) = peaks[(lo, blend)], peaks[(hi, blend)]
            lines.append(f"- {blend}: peak at {hi}^2 / {lo}^2 = {b / a:.3f} "
                         f"(above resident: {b_run / max(a_run, 1):.3f}); target <= 1.10")
    lines.append("- s/tile = (total - Lanczos) / tiles; overhead = s/tile / plain img2img of the same tile - 1; "
                 "target <= +10%")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
