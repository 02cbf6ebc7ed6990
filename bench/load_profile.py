"""Where the warm load's time goes (GPU host): the raw parallel reader against the loader, stage by stage.

    python bench/load_profile.py --weights /tmp/zw [--out profile.json]
    python bench/load_profile.py --weights /tmp/zw_tiny --device cpu --scale tiny   # smoke run (tests)

With the three full-size single files in the page cache (written first if missing, as bench_load.py does):

1. raw: ``fastread.read_tensors`` of each whole file in its own dtype, no module: pread with 8/12/16 threads,
   and the hybrid mode (one or two workers register their chunks, the others pread);
2. stages: the loader's own calls (``load_dit``, ``load_vae``, ``LazyTextEncoder.get``) with the meta builds
   timed on their own;
3. a cProfile of one warm ``load_dit`` + ``get`` (main thread: time waiting for the readers against Python work),
   and one of ``load_vae`` (small tensors: the per-tensor costs);
4. the three components loaded at once from three threads (the ceiling of overlapping them);
5. the cost of the device allocations alone (the DiT's tensor sizes after ``empty_cache``), of the same bytes in one
   allocation, and of the per-tensor allocations carved from a segment reserved just before.

Prints one JSON line per measurement and writes them all to ``--out``; a step that fails prints an ``error`` row
and the next step runs. ``--device cpu --scale tiny`` runs every step on the CPU with scaled-down files (pread
only: the registering modes need CUDA), so the script is checked before GPU time is spent on it
(tests/unit/test_bench_smoke.py); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from bench_load import generate, load_jobs, paths  # noqa: E402
from dit_speed_lab import ROWS, row  # noqa: E402
from meta_build_time import meta_build_jobs  # noqa: E402


DEV = torch.device("cuda:0")  # --device


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize(DEV)


def fresh() -> None:
    gc.collect()
    sync()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def warm_cache(files) -> None:
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def _best_reads(files, reps: int, empty_cache: bool) -> dict[str, float]:
    """Best seconds per file of ``read_tensors`` of the whole file in its own dtype, ``reps`` rounds;
    ``empty_cache``: the allocator's cache is emptied before each read (else it is kept between them)."""
    from zimage_nodes.core.fastread import read_tensors
    from zimage_nodes.core.st_io import read_header
    per: dict[str, list[float]] = {}
    fresh()
    for _ in range(reps):
        for kind, f in files.items():
            if empty_cache:
                fresh()
            t = time.perf_counter()
            keep = [x for _, x in read_tensors(f, list(read_header(f).tensors), DEV, lambda n, i: None)]
            sync()
            per.setdefault(kind, []).append(time.perf_counter() - t)
            del keep
    return {k: min(v) for k, v in per.items()}


def raw(files) -> None:
    settings = [("pread", 8, 0), ("pread", 12, 0), ("pread", 16, 0), ("hybrid", 12, 1), ("hybrid", 13, 1),
                ("hybrid", 14, 2)]
    if DEV.type != "cuda":
        settings = [s for s in settings if s[0] == "pread"]
    nbytes = {k: f.stat().st_size for k, f in files.items()}
    for mode, threads, reg in settings:
        os.environ.update(ZIMAGE_FASTREAD=mode, ZIMAGE_LOAD_THREADS=str(threads),
                          ZIMAGE_LOAD_REGISTER_WORKERS=str(max(1, reg)))
        best = _best_reads(files, 2, empty_cache=True)
        row(f"raw read {mode} {threads} threads ({reg} registering)", **{f"{k}_s": round(v, 4) for k, v in best.items()},
            sum_s=round(sum(best.values()), 4),
            **{f"{k}_gbps": round(nbytes[k] / best[k] / 1e9, 1) for k in best})
    for k in ("ZIMAGE_FASTREAD", "ZIMAGE_LOAD_THREADS", "ZIMAGE_LOAD_REGISTER_WORKERS"):
        os.environ.pop(k, None)
    # the same reads with the allocator's cache kept between them (as bench/read_sweep.py measured 45.6 GB/s):
    # the difference from the pread rows above is what allocating after empty_cache costs
    best = _best_reads(files, 3, empty_cache=False)
    row("raw read pread default threads, allocator cache kept", **{f"{k}_s": round(v, 4) for k, v in best.items()},
        sum_s=round(sum(best.values()), 4))


def stages(plan, dev) -> None:
    builds, loads = meta_build_jobs(plan), load_jobs(plan, dev)
    for rep in range(2):
        fresh()
        t, loaded = {}, {}
        for name, job in builds.items():  # the meta builds alone (the loads below include them again)
            s = time.perf_counter()
            job()
            t[name] = time.perf_counter() - s
        for name, job in loads.items():
            s = time.perf_counter()
            loaded[name] = job()
            sync()
            t[f"load_{name}"] = time.perf_counter() - s
        t["sum_loads"] = sum(t[f"load_{name}"] for name in loads)
        row(f"stages rep {rep}", **{k: round(v, 4) for k, v in t.items()})
        del loaded


def profiled(plan, dev) -> None:
    loads = load_jobs(plan, dev)
    fresh()
    pr = cProfile.Profile()
    pr.enable()
    dit, te = loads["dit"](), loads["te"]()
    sync()
    pr.disable()
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(30)
        row(f"cprofile dit+te by {key}", text=s.getvalue()[-9000:])
    del dit, te
    fresh()  # the VAE: 0.17 GB in 0.11 s on the H200 host (1.5 GB/s), so per-tensor costs dominate
    pr = cProfile.Profile()
    pr.enable()
    vae = loads["vae"]()
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    row("cprofile vae by tottime", text=s.getvalue()[-9000:])
    del vae


def concurrent(plan, dev) -> None:
    for rep in range(2):
        fresh()
        out, times = {}, {}

        def run(name, fn):
            s = time.perf_counter()
            out[name] = fn()
            sync()
            times[name] = time.perf_counter() - s

        s = time.perf_counter()
        ths = [threading.Thread(target=run, args=(k, v)) for k, v in load_jobs(plan, dev).items()]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        total = time.perf_counter() - s
        row(f"concurrent rep {rep}", total_s=round(total, 4), **{f"{k}_s": round(v, 4) for k, v in times.items()},
            ok=sorted(out))
        del out


def alloc(plan) -> None:
    from zimage_nodes.core.st_io import torch_dtype
    infos = [i for h in plan.dit.headers for i in h.tensors.values()]
    for rep in range(2):
        fresh()
        s = time.perf_counter()
        keep = [torch.empty(i.shape, dtype=torch_dtype(i), device=DEV) for i in infos]
        sync()
        row(f"alloc dit tensors rep {rep}", s=round(time.perf_counter() - s, 4), n=len(keep))
        del keep
    total = sum(i.nbytes for i in infos)
    for rep in range(2):  # the same bytes in one allocation: is the cost per call or per byte?
        fresh()
        s = time.perf_counter()
        one = torch.empty(total, dtype=torch.uint8, device=DEV)
        sync()
        row(f"alloc dit bytes at once rep {rep}", s=round(time.perf_counter() - s, 4), gb=round(total / 1e9, 2))
        del one
    for rep in range(2):  # per-tensor allocations carved from a segment reserved (and freed) just before
        fresh()
        s = time.perf_counter()
        torch.empty(total, dtype=torch.uint8, device=DEV)  # freed at once: the allocator keeps the segment
        keep = [torch.empty(i.shape, dtype=torch_dtype(i), device=DEV) for i in infos]
        sync()
        row(f"alloc dit tensors after reserving rep {rep}", s=round(time.perf_counter() - s, 4), n=len(keep))
        del keep


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda:0", help="cuda:N, or cpu for a smoke run")
    ap.add_argument("--scale", choices=("full", "tiny"), default="full", help="the files' size (tiny: smoke run)")
    args = ap.parse_args()
    global DEV
    DEV = dev = torch.device(args.device)
    from zimage_nodes.core import loader
    row("generate", s=round(generate(args.weights, args.scale), 1))
    files = {k: Path(v) for k, v in paths(args.weights).items()}
    warm_cache(files.values())
    torch.empty(1, device=dev)
    row("env", gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none (cpu)", torch=torch.__version__,
        cpus=os.cpu_count(),
        sizes_gb={k: round(f.stat().st_size / 1e9, 3) for k, f in files.items()})
    plan = loader.plan_single_files(files["dit"], files["te"], files["vae"], REPO)
    for step in (raw, lambda _f: stages(plan, dev), lambda _f: profiled(plan, dev),
                 lambda _f: concurrent(plan, dev), lambda _f: alloc(plan)):
        try:
            step(files)
        except Exception as e:  # noqa: BLE001
            row("error", error=f"{type(e).__name__}: {str(e)[:400]}")
        if args.out:
            args.out.write_text(json.dumps(ROWS, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
