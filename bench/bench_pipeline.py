"""GPU benchmark: our pack's pipeline against ComfyUI native and diffusers, same GPU, same run.

    python bench/bench_pipeline.py --weights /tmp/zimage_w --peers ours,comfy,diffusers --caps 0,8,4 \
        --out bench/results/RESULTS.md

Writes full-size random-weight checkpoints in the real single-file layouts (once, into --weights),
then runs each (peer, VRAM cap) in its own process so caps and caches never leak between runs:
- ours: the pack's core modules called directly (the code the nodes call): staged loader, DiT,
  the memory plan of core/policy.plan for the cap (block streaming below the DiT's size), Turbo
  schedule (8 forwards), VAE decode (tiled when the plan says so); the DiT blocks compiled when
  resident, as the sampler's compile=auto does (--compile off for eager); s/forward = DiT time / 8;
  the ``_graph`` peers also replay the forwards after the first from a CUDA graph recorded per image, as
  compile=auto does with ZIMAGE_CUDA_GRAPHS=1 when the budget has room (core/graphs.py), and check that the
  replayed latent equals the plain loop's;
- ours_b4 / ours_graph_b4: ours / ours_graph, then the same loop and VAE decode for a batch of 4 images (the blocks
  compile again for batch 4 first), reporting images/s against batch 1 (the sampler issue asks >= 1.1 x);
- ours_fp8: the same with the DiT's block linears converted to fp8 (per-tensor scales) with fp8
  matmuls (the policy's fp8_fast), and the mean absolute difference of the image (0..1) from the
  bf16 image of the same seed and caption;
- comfy: ComfyUI 0.3.75's own functions with the official template's settings (load_diffusion_model
  = UNETLoader, ModelSamplingAuraFlow shift 3 as an object patch, comfy.sample.sample = KSampler with
  res_multistep / simple / 9 steps / cfg 1, comfy.sd.VAE decode = VAEDecode), with --reserve-vram
  so ComfyUI plans for the cap (and --lowvram under 16 GB, as measured in peers.md);
- diffusers: ZImageTransformer2DModel + AutoencoderKL from the same files via diffusers' converters,
  8 forwards with FlowMatchEulerDiscreteScheduler.
A cap is torch.cuda.set_per_process_memory_fraction(cap / total). Timings use CUDA events after a
warm-up; the median of --runs images. The text embedding is computed once and cached (not timed).

--alloc picks PyTorch's CUDA allocator for every worker: native (the caching allocator, the default, as every
table in docs/BENCHMARKS.md so far) or async (backend:cudaMallocAsync, what ComfyUI's main.py turns on by
default for torch 2.x on CUDA; its --disable-cuda-malloc turns it off). The table says which one ran.

--smoke runs the ours* peers on the CPU with the scaled-down ("tiny") files at 256x256, the blocks compiled with
dynamo's eager backend (CUDA graphs pass through on the CPU), so the script's own code is checked before GPU
time is spent on it (tests/unit/test_bench_smoke.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1024 ** 3
W = H = 1024
CAP_TOKENS = 128
COMPILE = True  # --compile off turns it off (in the workers too)
SMOKE = False  # --smoke: CPU, tiny files, 256x256 (in the workers too)
INDUCTOR_OPTIONS: dict | None = None  # --inductor-options (ours* workers)
DEVICE = "cuda"
CPU_BUDGET = 64 * 1024 ** 3  # the memory plan's budget in a CPU smoke run
FLOP_PER_FORWARD = 56.6e12  # 1024x1024, 128 caption tokens (zimage.md)


# ---------------------------------------------------------------- helpers

def cuda_time(fn, sync=True):
    """(fn(), seconds) by CUDA events; by the wall clock where CUDA is missing (the benches' CPU smoke runs)."""
    import torch
    if not torch.cuda.is_available():
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    if sync:
        torch.cuda.synchronize()
    return out, start.elapsed_time(end) / 1000.0


def apply_cap(cap_gb: float) -> None:
    import torch
    if cap_gb > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * GB / total))


def sync() -> None:
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def allocator() -> str:
    """The CUDA allocator this process uses ("native" or "cudaMallocAsync"); "none" without CUDA."""
    import torch
    return torch.cuda.get_allocator_backend() if DEVICE == "cuda" and torch.cuda.is_available() else "none"


def rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def weight_paths(root: Path) -> dict[str, Path]:
    from zimage_nodes.testing import weights
    return weights.single_files(root / "models")


def generate(root: Path) -> None:
    from zimage_nodes.testing import weights
    t = time.time()
    scale = "tiny" if SMOKE else "full"
    weights.ensure_single_files(root / "models", scale)
    print(f"[bench] {scale} weights ready in {time.time() - t:.0f}s", flush=True)


def _tokenizer_dir() -> Path:
    from zimage_nodes.testing.comfy import comfy_root
    return comfy_root() / "comfy" / "text_encoders" / "qwen25_tokenizer"


def fake_caption(dim: int = 2560):
    """A real-looking caption embedding (Qwen3 hidden states are ~unit scale with outliers)."""
    import torch
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, CAP_TOKENS, dim, generator=g)


# ---------------------------------------------------------------- workers (one process each)

def worker_ours(root: Path, cap: float, runs: int, fp8: bool = False, attention: str = "auto",
                graphs: bool = False, batch4: bool = False, fp8_attention: bool = False) -> dict:
    import torch
    from zimage_nodes.core import compile as dit_compile, loader, policy as P, sampling, schedule, vae as vae_mod
    from zimage_nodes.core.graphs import StepGraphs
    from zimage_nodes.core.attention import auto_backend
    from zimage_nodes.core.streaming import BlockStreamer
    paths = weight_paths(root)
    dev = torch.device(DEVICE)
    cuda = dev.type == "cuda"
    apply_cap(cap)
    base_rss = rss()
    t0 = time.time()
    plan = loader.plan_single_files(paths["dit"], paths["te"], paths["vae"], _tokenizer_dir())
    sizes = P.sizes_from_shapes(plan.dit.shapes, plan.text_encoder.shapes, plan.vae.shapes)
    budget = int(cap * GB) if cap > 0 else (torch.cuda.get_device_properties(0).total_memory if cuda else CPU_BUDGET)
    req = P.Request(W, H, caption_tokens=CAP_TOKENS)
    mplan = P.plan(P.Policy(), sizes, req, budget)
    if mplan.mode is P.Mode.FULL_GPU:  # the TE would be resident too; embedding cached here, so DiT+VAE
        mplan.mode = P.Mode.MODEL_OFFLOAD
    streamed = mplan.mode in (P.Mode.BLOCK_SWAP, P.Mode.SEQUENTIAL)
    dit = loader.load_dit(plan.dit, torch.device("cpu") if streamed else dev, torch.bfloat16, torch.bfloat16)
    sync()
    load_s = time.time() - t0
    used = auto_backend(dev) if attention == "auto" else attention  # auto: as the loader node resolves it
    if used != "sdpa" and (why := dit.set_attention_backend(used)):
        raise RuntimeError(why)
    vae = loader.load_vae(plan.vae, dev, torch.bfloat16)
    streamer = None
    if streamed:
        units = list(dit.context_refiner) + list(dit.noise_refiner) + list(dit.layers)
        inside = {id(t) for u in units for t in u.parameters()}
        for name, p in dit.named_parameters():
            if id(p) not in inside:
                p.data = p.data.to(dev)
        streamer = BlockStreamer(units, dev, mplan.resident_dit, mplan.prefetch).install()
    cap_feats = fake_caption(dit.cfg.cap_feat_dim).to(dev, torch.bfloat16)
    sigmas = schedule.make_sigmas("turbo", 9)
    fwd_times: list[float] = []
    compiled = COMPILE and not streamed  # the sampler's compile=auto: resident DiT on CUDA
    backend = "eager" if SMOKE else "inductor"
    options = INDUCTOR_OPTIONS if backend == "inductor" else None  # dynamo's eager backend takes no options
    if compiled:
        dit_compile.enable(dit, backend=backend, options=options)
    mad = latent_rel = None
    if fp8:  # the bf16 image of seed 1 first, then the same DiT converted in place (fp8_fast)
        from zimage_nodes.core import ops
        g = torch.Generator().manual_seed(1)
        noise = torch.randn(1, 16, H // 8, W // 8, generator=g).to(dev)
        with torch.inference_mode():
            ref_x0 = sampling.sample(dit, noise, sigmas, cap_feats)
            ref_img = vae.decode(vae_mod.model_to_raw(ref_x0)).float()
        ops.quantize_linears_fp8(dit, fp8_matmul=True)
        fp8_attention = dit.set_fp8_attention(fp8_attention)  # FA3's fp8 forward (backend fa3): its peers only
        torch._dynamo.reset()
        if compiled:
            dit_compile.disable(dit)
            dit_compile.enable(dit, backend=backend, options=options)

    def model_fn(x, s, c):
        return dit(x, s, c)

    use_graphs = graphs and compiled and P.graph_headroom(mplan, req)  # compile=auto with ZIMAGE_CUDA_GRAPHS=1
    graph_errors: list[str] = []

    def one(seed, batch=1, graphed=use_graphs, vplan=mplan):
        """(DiT s, VAE s, finite) for ``batch`` images of ``seed``; ``graphed``: through StepGraphs, one per
        run as the sampler does; ``vplan``: the memory plan whose VAE tiling the decode follows."""
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, 16, H // 8, W // 8, generator=g).to(dev)
        fn = StepGraphs(model_fn) if graphed else model_fn
        with torch.inference_mode():
            x0, t_dit = cuda_time(lambda: sampling.sample(fn, noise, sigmas, cap_feats))
            if graphed:
                fn.close()
                if fn.error:
                    graph_errors.append(fn.error)
            raw = vae_mod.model_to_raw(x0)
            if vplan.vae_tiled:
                img, t_vae = cuda_time(lambda: vae.decode_tiled(raw, vplan.vae_tile, 64))
            else:
                img, t_vae = cuda_time(lambda: vae.decode(raw))
        return t_dit, t_vae, bool(torch.isfinite(x0).all())

    one(0)  # warm-up
    graph_diff = None
    if use_graphs:  # the replayed forwards must give the plain loop's latent (same kernels, same inputs)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(1, 16, H // 8, W // 8, generator=g).to(dev)
        with torch.inference_mode():
            plain = sampling.sample(model_fn, noise, sigmas, cap_feats)
            fn = StepGraphs(model_fn)
            replayed = sampling.sample(fn, noise, sigmas, cap_feats)
            fn.close()
        graph_diff = float((plain - replayed).abs().max())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = [one(i + 1) for i in range(runs)]
    b4: dict = {}
    if batch4:  # the sampler issue: batch 4 throughput >= 1.1 x batch 1 (same process, same compiled blocks)
        req4 = P.Request(W, H, batch=4, caption_tokens=CAP_TOKENS)
        plan4 = P.plan(P.Policy(), sizes, req4, budget)
        graphs4 = use_graphs and P.graph_headroom(plan4, req4)
        one(100, 4, graphs4, plan4)  # warm-up: the blocks compile for batch 4 (the batch dimension is static)
        r4 = [one(101 + i, 4, graphs4, plan4) for i in range(runs)]
        dit4, vae4 = statistics.median(r[0] for r in r4), statistics.median(r[1] for r in r4)
        dit1, vae1 = statistics.median(r[0] for r in res), statistics.median(r[1] for r in res)
        b4 = {"batch4_dit_s": dit4, "batch4_vae_s": vae4, "batch4_graphs": graphs4,
              "batch4_throughput_x": 4 * (dit1 + vae1) / (dit4 + vae4), "batch4_dit_throughput_x": 4 * dit1 / dit4}
    with torch.inference_mode():  # one forward alone (launch latency not hidden by the loop), for reference
        x = torch.randn(1, 16, H // 8, W // 8, device=dev)
        for _ in range(3):
            fwd_times.append(cuda_time(lambda: dit(x, torch.tensor([0.5], device=dev), cap_feats))[1])
        if fp8:
            g = torch.Generator().manual_seed(1)
            noise = torch.randn(1, 16, H // 8, W // 8, generator=g).to(dev)
            x0 = sampling.sample(dit, noise, sigmas, cap_feats)
            img = vae.decode(vae_mod.model_to_raw(x0)).float()  # IMAGE, 0..1
            mad = float((img - ref_img).abs().mean())
            latent_rel = float((x0.float() - ref_x0.float()).norm() / ref_x0.float().norm())
    dit_s = statistics.median(r[0] for r in res)
    mode = (mplan.describe() + (", compiled" if compiled else "")
            + (f" with {json.dumps(options)}" if compiled and options else "")
            + ((", CUDA graph" if not graph_errors else f", CUDA graph failed: {graph_errors[0]}") if use_graphs else "")
            + (", fp8 matmuls" if fp8 else "")
            + f", attention {used}" + (" (auto)" if attention == "auto" else "") + (" fp8" if fp8 and fp8_attention else ""))
    if b4:
        mode += (f"; batch 4: DiT {b4['batch4_dit_s']:.3f} s + VAE {b4['batch4_vae_s']:.3f} s, images/s "
                 f"{b4['batch4_throughput_x']:.2f} x batch 1 (DiT alone {b4['batch4_dit_throughput_x']:.2f} x)")
    peer = ("ours_fp8" if fp8 else "ours") + ("" if attention == "auto" else f"_{attention}") + (
        "_graph" if graphs else "") + ("_b4" if batch4 else "")
    return {**b4, "peer": peer, "cap": cap, "mode": mode, "dit_s": dit_s,
            "vae_s": statistics.median(r[1] for r in res), "finite": all(r[2] for r in res),
            "fwd_s": dit_s / (len(sigmas) - 1), "fwd_alone_s": statistics.median(fwd_times),
            "image_mad_vs_bf16": mad, "graph_vs_plain_max_abs": graph_diff, "latent_rel_l2_vs_bf16": latent_rel,
            "peak_gb": torch.cuda.max_memory_allocated() / GB if cuda else 0.0, "allocator": allocator(),
            "predicted_gb": mplan.peak / GB, "load_s": load_s,
            "rss_gb": (rss() - base_rss) / GB, "streamed_gb_per_fwd":
                (sum(u.nbytes for u in streamer.streamed) / GB) if streamer else 0.0}


def worker_comfy(root: Path, cap: float, runs: int) -> dict:
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    argv: list[str] = []
    if cap > 0:
        argv += ["--reserve-vram", f"{max(0.0, (total - cap * GB) / GB):.2f}"]
        if cap < 16:
            argv.append("--lowvram")
    from zimage_nodes.testing.comfy import ensure_comfy_importable
    ensure_comfy_importable(root, extra_argv=argv)
    apply_cap(cap)
    import comfy.model_management as mm
    import comfy.model_sampling
    import comfy.sample
    import comfy.sd
    import comfy.utils
    paths = weight_paths(root)
    t0 = time.time()
    model = comfy.sd.load_diffusion_model(str(paths["dit"]))
    load_s = time.time() - t0

    class AuraFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = AuraFlow(model.model.model_config)
    ms.set_parameters(shift=3.0, multiplier=1.0)  # exactly what ModelSamplingAuraFlow(shift=3) patches
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths["vae"])))
    cond = fake_caption()
    positive, negative = [[cond, {}]], [[torch.zeros_like(cond), {}]]
    latent = torch.zeros(1, 16, H // 8, W // 8)

    def one(seed):
        noise = comfy.sample.prepare_noise(latent, seed)
        samples, t_dit = cuda_time(lambda: comfy.sample.sample(
            m, noise, 9, 1.0, "res_multistep", "simple", positive, negative, latent, denoise=1.0))
        img, t_vae = cuda_time(lambda: vae.decode(samples))
        return t_dit, t_vae, bool(torch.isfinite(samples).all())

    one(0)
    torch.cuda.reset_peak_memory_stats()
    res = [one(i + 1) for i in range(runs)]
    dit_s = statistics.median(r[0] for r in res)
    return {"peer": "comfy", "cap": cap, "mode": "ComfyUI " + mm.vram_state.name, "dit_s": dit_s,
            "vae_s": statistics.median(r[1] for r in res), "finite": all(r[2] for r in res), "fwd_s": dit_s / 9,
            "peak_gb": torch.cuda.max_memory_allocated() / GB, "load_s": load_s}


def worker_diffusers(root: Path, cap: float, runs: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_z_image_transformer_checkpoint_to_diffusers)
    from safetensors.torch import load_file
    from zimage_nodes.testing import weights as Wt
    apply_cap(cap)
    paths = weight_paths(root)
    full = Wt.SCALES["full"]
    t0 = time.time()
    with torch.device("meta"):
        dit = ZImageTransformer2DModel.from_config(Wt.dit_diffusers_config(full.dit))
    sd = convert_z_image_transformer_checkpoint_to_diffusers(load_file(str(paths["dit"]), device="cuda"))
    dit.load_state_dict(sd, assign=True)
    dit = dit.to(torch.bfloat16).eval()
    del sd
    load_s = time.time() - t0
    vcfg = Wt.vae_diffusers_config(full.vae)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(paths["vae"]), device="cuda"), vcfg), assign=True)
    vae = vae.to(torch.bfloat16).eval()
    cap_feats = fake_caption().to("cuda", torch.bfloat16)[0]
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

    def one(seed):
        g = torch.Generator().manual_seed(seed)
        lat = torch.randn(1, 16, H // 8, W // 8, generator=g).to("cuda")

        def loop():
            nonlocal lat
            sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / 8, 8).tolist(), device="cuda")
            sched.set_begin_index(0)
            for t in sched.timesteps:
                ts = ((1000 - t) / 1000).expand(1)
                out = dit([lat.to(torch.bfloat16).unsqueeze(2)[0]], ts, [cap_feats], return_dict=False)[0]
                v = -torch.stack([o.float() for o in out]).squeeze(2)
                lat = sched.step(v, t, lat, return_dict=False)[0]
            return lat

        with torch.inference_mode():
            x, t_dit = cuda_time(loop)
            z = (x / 0.3611 + 0.1159).to(torch.bfloat16)
            img, t_vae = cuda_time(lambda: vae.decode(z).sample)
        return t_dit, t_vae, bool(torch.isfinite(x).all())

    one(0)
    torch.cuda.reset_peak_memory_stats()
    res = [one(i + 1) for i in range(runs)]
    dit_s = statistics.median(r[0] for r in res)
    return {"peer": "diffusers", "cap": cap, "mode": "all on GPU, SDPA", "dit_s": dit_s,
            "vae_s": statistics.median(r[1] for r in res), "finite": all(r[2] for r in res), "fwd_s": dit_s / 8,
            "peak_gb": torch.cuda.max_memory_allocated() / GB, "load_s": load_s}


def worker_calib(root: Path, cap: float, runs: int) -> dict:
    """Activation peak of one DiT forward (weights resident) at 512..2048 px and batch 1, 2, 4, against
    the estimator's activation model."""
    import torch
    from zimage_nodes.core import loader, policy as P
    paths = weight_paths(root)
    plan = loader.plan_single_files(paths["dit"], paths["te"], paths["vae"], _tokenizer_dir())
    dit = loader.load_dit(plan.dit, torch.device("cuda"), torch.bfloat16, torch.bfloat16)
    cap_feats = fake_caption().to("cuda", torch.bfloat16)
    rows = []
    for side in (512, 1024, 1536, 2048):
        for batch in (1, 2, 4):
            x = torch.randn(batch, 16, side // 8, side // 8, device="cuda")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                _, t = cuda_time(lambda: dit(x, torch.full((batch,), 0.5, device="cuda"), cap_feats.expand(batch, -1, -1)))
            measured = torch.cuda.max_memory_allocated() - base
            req = P.Request(side, side, batch=batch, caption_tokens=CAP_TOKENS)
            predicted = req.tokens * P.DIT_ACT_BYTES_PER_TOKEN + P.DIT_ACT_CONSTANT
            rows.append({"side": side, "batch": batch, "tokens": req.tokens, "measured_gb": measured / GB,
                         "predicted_gb": predicted / GB, "fwd_s": t,
                         "bytes_per_token": measured / req.tokens})
            del x
    return {"peer": "calib", "cap": cap, "rows": rows}


def worker_modes(root: Path, cap: float, runs: int) -> dict:
    """The estimator in each GPU mode: one DiT forward at 512..2048 px, batch 1, 2, 4, the DiT placed as the
    plan says (resident for full_gpu/model_offload; streamed with the plan's resident blocks at a 4 GB budget
    for block_swap; sequential), peak allocated against the plan's DiT-stage prediction."""
    import torch
    from zimage_nodes.core import loader, policy as P
    from zimage_nodes.core.streaming import BlockStreamer
    paths = weight_paths(root)
    lp = loader.plan_single_files(paths["dit"], paths["te"], paths["vae"], _tokenizer_dir())
    sizes = P.sizes_from_shapes(lp.dit.shapes, lp.text_encoder.shapes, lp.vae.shapes)
    dit = loader.load_dit(lp.dit, torch.device("cpu"), torch.bfloat16, torch.bfloat16)
    units = list(dit.context_refiner) + list(dit.noise_refiner) + list(dit.layers)
    inside = {id(t) for u in units for t in u.parameters()}
    cap_feats = fake_caption().to("cuda", torch.bfloat16)
    rows = []
    for mode, budget_gb in ((P.Mode.MODEL_OFFLOAD, 40), (P.Mode.BLOCK_SWAP, 4), (P.Mode.SEQUENTIAL, 4)):
        for p in dit.parameters():
            if id(p) not in inside:
                p.data = p.data.to("cuda")
        for side in (512, 1024, 1536, 2048):
            for batch in (1, 2, 4):
                req = P.Request(side, side, batch=batch, caption_tokens=CAP_TOKENS)
                plan = P.plan(P.Policy(mode=mode), sizes, req, int(budget_gb * GB))
                if mode is P.Mode.MODEL_OFFLOAD:
                    for u in units:
                        u.to("cuda")
                    streamer = None
                else:
                    streamer = BlockStreamer(units, torch.device("cuda"), plan.resident_dit, plan.prefetch).install()
                x = torch.randn(batch, 16, side // 8, side // 8, device="cuda")
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    _, t = cuda_time(lambda: dit(x, torch.full((batch,), 0.5, device="cuda"),
                                                 cap_feats.expand(batch, -1, -1)))
                measured = torch.cuda.max_memory_allocated()
                rows.append({"mode": mode.value, "side": side, "batch": batch, "measured_gb": measured / GB,
                             "predicted_gb": plan.peaks["dit"] / GB, "fwd_s": t})
                del x
                if streamer is not None:
                    streamer.remove()
                for u in units:
                    u.to("cpu")
                torch.cuda.empty_cache()
    return {"peer": "modes", "cap": cap, "rows": rows}


SMOKE_CEILINGS = {"matmul_tflops": 1.0, "h2d_gbs": 1.0, "gpu": "none (CPU smoke run: the numbers mean nothing)",
                  "torch": "-", "cuda": "-"}


def ceilings() -> dict:
    """Measured bf16 matmul rate at the FFN shape and pinned host-to-device rate."""
    import torch
    a = torch.randn(4224, 3840, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3840, 10240, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _, t = cuda_time(lambda: [a @ b for _ in range(50)])
    tflops = 2 * 4224 * 3840 * 10240 * 50 / t / 1e12
    h = torch.empty(2 * GB, dtype=torch.uint8).pin_memory()
    d = torch.empty_like(h, device="cuda")
    d.copy_(h, non_blocking=True)
    _, t = cuda_time(lambda: [d.copy_(h, non_blocking=True) for _ in range(5)])
    return {"matmul_tflops": tflops, "h2d_gbs": 10 * GB / t / 1e9, "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__, "cuda": torch.version.cuda}


WORKERS = {"ours": worker_ours, "ours_fp8": partial(worker_ours, fp8=True),
           "ours_fa3": partial(worker_ours, attention="fa3"), "ours_sdpa": partial(worker_ours, attention="sdpa"),
           "ours_fp8_fa3": partial(worker_ours, fp8=True, attention="fa3", fp8_attention=True),
           "ours_fp8_fa3_graph": partial(worker_ours, fp8=True, attention="fa3", fp8_attention=True, graphs=True),
           "ours_graph": partial(worker_ours, graphs=True), "ours_fp8_graph": partial(worker_ours, fp8=True, graphs=True),
           "ours_b4": partial(worker_ours, batch4=True), "ours_graph_b4": partial(worker_ours, graphs=True, batch4=True),
           "comfy": worker_comfy, "diffusers": worker_diffusers, "calib": worker_calib, "modes": worker_modes}


# ---------------------------------------------------------------- driver

def table(rows: list[dict], ceil: dict, driver: str, alloc: str = "native") -> str:
    floor_fwd = FLOP_PER_FORWARD / (ceil["matmul_tflops"] * 1e12)
    comfy = {r["cap"]: r for r in rows if r["peer"] == "comfy" and "error" not in r}
    allocator = "cudaMallocAsync (ComfyUI's default)" if alloc == "async" else "PyTorch's caching allocator (native)"
    out = [f"GPU: {ceil['gpu']}, driver {driver}, torch {ceil['torch']} (CUDA {ceil['cuda']}); "
           f"measured bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, pinned H2D {ceil['h2d_gbs']:.1f} GB/s; "
           f"floor per DiT forward {floor_fwd * 1000:.0f} ms ({FLOP_PER_FORWARD / 1e12:.1f} TFLOP); "
           f"CUDA allocator: {allocator}.", "",
           "| peer | cap GB | mode | DiT s/image | s/forward | VAE s | image s | x ComfyUI (image) | "
           "x floor (forward) | peak alloc GB | predicted GB | load s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["peer"] in ("calib", "modes") and "rows" in r:
            continue
        if "error" in r:
            out.append(f"| {r['peer']} | {r['cap'] or 'card'} | error: {r['error'][:120]} |||||||||")
            continue
        img = r["dit_s"] + r["vae_s"]
        c = comfy.get(r["cap"])
        ratio = f"{img / (c['dit_s'] + c['vae_s']):.2f}" if c else "-"
        floor = max(floor_fwd, r.get("streamed_gb_per_fwd", 0) * GB / (ceil["h2d_gbs"] * 1e9))
        pred = f"{r['predicted_gb']:.2f}" if "predicted_gb" in r else "-"
        fin = "" if r["finite"] else " (NaN!)"
        if r.get("image_mad_vs_bf16") is not None:
            r = {**r, "mode": f"{r['mode']}; vs bf16, same seed: image mean abs diff {r['image_mad_vs_bf16']:.4f} "
                              f"(0..1 scale), latent relative L2 {r['latent_rel_l2_vs_bf16']:.3f}"}
        out.append(f"| {r['peer']} | {r['cap'] or 'card'} | {r['mode']} | {r['dit_s']:.3f}{fin} | {r['fwd_s']:.3f} | "
                   f"{r['vae_s']:.3f} | {img:.3f} | {ratio} | {r['fwd_s'] / floor:.2f} | {r['peak_gb']:.2f} | {pred} | "
                   f"{r['load_s']:.1f} |")
    for r in rows:
        if r["peer"] == "calib" and "rows" in r:
            out += ["", "Estimator: DiT activation peak of one forward (weights resident), measured vs predicted.", "",
                    "| size | batch | tokens | measured GB | predicted GB | predicted / measured | s/forward |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {c['side']}^2 | {c['batch']} | {c['tokens']} | {c['measured_gb']:.3f} | {c['predicted_gb']:.3f} | "
                    f"{c['predicted_gb'] / c['measured_gb']:.2f} | {c['fwd_s']:.3f} |" for c in r["rows"]]
    for r in rows:
        if r["peer"] == "modes" and "rows" in r:
            out += ["", "Estimator per mode: peak allocated during one DiT forward (weights placed as planned; "
                    "block_swap and sequential at a 4 GB budget) vs the plan's DiT-stage prediction.", "",
                    "| mode | size | batch | measured GB | predicted GB | predicted / measured | s/forward |",
                    "|---|---|---|---|---|---|---|"]
            out += [f"| {c['mode']} | {c['side']}^2 | {c['batch']} | {c['measured_gb']:.3f} | {c['predicted_gb']:.3f} | "
                    f"{c['predicted_gb'] / c['measured_gb']:.2f} | {c['fwd_s']:.3f} |" for c in r["rows"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="/tmp/zimage_weights")
    ap.add_argument("--peers", default="ours,comfy,diffusers")
    ap.add_argument("--caps", default="0", help="comma-separated VRAM caps in GB (0 = whole card)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", help="markdown file to write the table to")
    ap.add_argument("--compile", choices=("auto", "off"), default="auto",
                    help="ours: compile the DiT blocks when resident (the sampler's default), or not")
    ap.add_argument("--alloc", choices=("native", "async"), default="native",
                    help="the workers' CUDA allocator: native (caching) or async (cudaMallocAsync, ComfyUI's default)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny files, 256x256: checks the script, not speed")
    ap.add_argument("--inductor-options", type=json.loads, default=None,
                    help='ours*: inductor options (JSON) for the compiled blocks, e.g. {"triton.multi_kernel": 1}')
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cap", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.weights)
    global COMPILE, SMOKE, DEVICE, W, H, INDUCTOR_OPTIONS
    COMPILE = args.compile == "auto"
    INDUCTOR_OPTIONS = args.inductor_options
    if args.smoke:
        SMOKE, DEVICE, W, H = True, "cpu", 256, 256
    if args.worker:
        try:
            print("RESULT " + json.dumps(WORKERS[args.worker](root, args.cap, args.runs)), flush=True)
        except Exception as e:  # reported in the table, the other runs go on
            import traceback
            traceback.print_exc()
            print("RESULT " + json.dumps({"peer": args.worker, "cap": args.cap, "error": f"{type(e).__name__}: {e}"}))
        return 0
    generate(root)
    ceil = SMOKE_CEILINGS if SMOKE else ceilings()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True).stdout.strip() or "?"
    except OSError:
        driver = "?"
    env = dict(os.environ)
    if args.alloc == "async":  # appended as ComfyUI's cuda_malloc.py does
        conf = env.get("PYTORCH_CUDA_ALLOC_CONF")
        env["PYTORCH_CUDA_ALLOC_CONF"] = f"{conf},backend:cudaMallocAsync" if conf else "backend:cudaMallocAsync"
    rows = []
    for cap in [float(c) for c in args.caps.split(",")]:
        for peer in args.peers.split(","):
            t = time.time()
            out = subprocess.run([sys.executable, __file__, "--weights", str(root), "--worker", peer,
                                  "--cap", str(cap), "--runs", str(args.runs), "--compile", args.compile]
                                 + (["--smoke"] if SMOKE else [])
                                 + (["--inductor-options", json.dumps(INDUCTOR_OPTIONS)] if INDUCTOR_OPTIONS else []),
                                 capture_output=True, text=True, env=env)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row = json.loads(line[7:]) if line else {"peer": peer, "cap": cap, "error": out.stderr[-300:]}
            rows.append(row)
            print(f"[bench] {peer} cap {cap}: {time.time() - t:.0f}s {json.dumps(row)}", flush=True)
            if args.out:  # kept as it goes: a run cut off by a time limit still leaves the rows measured so far
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).with_suffix(".json").write_text(
                    json.dumps({"ceilings": ceil, "driver": driver, "rows": rows, "partial": True}, indent=1))
            if "error" in row:
                print(out.stderr[-3000:], flush=True)
    text = table(rows, ceil, driver, args.alloc)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"ceilings": ceil, "driver": driver, "rows": rows},
                                                                  indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
