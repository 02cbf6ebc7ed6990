"""GPU benchmark of the staged loader: cold and warm load of the three components through core/loader.py.

    python bench/bench_load.py --dir /tmp/zimage_w [--out bench/results/load.md] [--disk-gb 8] [--warm-runs 2]

Writes the full-size random-weight checkpoints (zimage_nodes.testing.weights, the single-file layouts users have:
diffusion_models/z_image_turbo_bf16.safetensors, text_encoders/qwen_3_4b.safetensors, vae/ae.safetensors; about
20.5 GB) into --dir/models unless they are there, then measures on cuda:0:
- disk rate: a dd-like sequential read (64 MiB reads) of the DiT file after dropping it from the page cache;
- pinned H2D rate: copies of a pinned 2 GiB host buffer to the GPU (CUDA events, best of 5), and pageable for
  reference;
- cold load: the three files dropped from the page cache (posix_fadvise DONTNEED after a sync), then plan (headers,
  identification) + load_dit + load_vae + the text encoder's first-use load, to cuda, bf16, synchronized;
- warm load: the same with the files in the page cache (best of --warm-runs);
- peak host memory above the baseline during each load, sampled every 2 ms by a thread (psutil): RSS, and RSS less
  its file-backed part (anonymous memory: what the loader allocates; mapped page-cache pages of the memory-mapped
  files count in RSS but are reclaimable).
Prints a markdown table with the ratios against the issue's limits:
  cold <= 1.3 x bytes / disk rate;  warm <= 1.3 x bytes / pinned H2D rate;  peak anonymous RSS <= largest tensor + 1 GB
where bytes are the bytes the loader streams (the text encoder's last layer and final norm are not read).
Budget: about 2-3 minutes to write the files once (16 cores), under a minute per measurement pass; 64 GB of disk is
enough (about 20.5 GB written).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9
GIB = 2 ** 30
LIMIT_FACTOR = 1.3


# ---------------------------------------------------------------- files

def paths(root: Path) -> dict[str, Path]:
    from zimage_nodes.testing import weights
    return weights.single_files(root / "models")


def generate(root: Path, scale: str = "full") -> float:
    """Write the single files unless present; returns the seconds spent."""
    from zimage_nodes.testing import weights
    if all(p.is_file() for p in paths(root).values()):
        return 0.0
    t = time.perf_counter()
    weights.ensure_single_files(root / "models", scale)
    os.sync()
    return time.perf_counter() - t


def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (dirty pages are written first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Fraction of the file in the page cache (util-linux fincore), or None when fincore is missing."""
    if shutil.which("fincore") is None:
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", str(path)],
                             capture_output=True, text=True, timeout=30, check=True).stdout.split()
        return int(out[0]) / max(1, int(out[1]))
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def disk_rate(path: Path, limit_bytes: int) -> tuple[float, int]:
    """(bytes/s, bytes read) of a sequential buffered read of the file's first limit_bytes, cache dropped."""
    drop_cache(path)
    buf = bytearray(64 * 2 ** 20)
    view = memoryview(buf)
    done = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < limit_bytes:
            n = f.readinto(view)
            if not n:
                break
            done += n
    return done / (time.perf_counter() - t), done


# ---------------------------------------------------------------- GPU transfer rates

def h2d_rates(nbytes: int = 2 * GIB, reps: int = 5) -> tuple[float, float]:
    """(pinned, pageable) host-to-device bytes/s, best of reps."""
    import torch
    dev = torch.device("cuda", 0)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out = []
    for pinned in (True, False):
        src = torch.ones(nbytes, dtype=torch.uint8).pin_memory() if pinned else torch.ones(nbytes, dtype=torch.uint8)
        best = 0.0
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=pinned)
            end.record()
            torch.cuda.synchronize()
            best = max(best, nbytes / (start.elapsed_time(end) / 1000.0))
        out.append(best)
        del src
    del dst
    torch.cuda.empty_cache()
    return out[0], out[1]


# ---------------------------------------------------------------- host memory

class PeakMemory:
    """Peak RSS and anonymous RSS (RSS less file-backed pages) above the level at start, sampled in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil
        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.base_rss, self.base_anon = self._read()
        self.peak_rss, self.peak_anon = self.base_rss, self.base_anon
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> tuple[int, int]:
        m = self._proc.memory_info()
        return m.rss, m.rss - getattr(m, "shared", 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, anon = self._read()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            time.sleep(self._interval)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        rss, anon = self._read()
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)

    @property
    def rss_above(self) -> int:
        return self.peak_rss - self.base_rss

    @property
    def anon_above(self) -> int:
        return self.peak_anon - self.base_anon


# ---------------------------------------------------------------- the load itself

def streamed_bytes(root: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes the loader reads, largest tensor it reads, bytes per component), from the headers."""
    from zimage_nodes.core import st_io
    from zimage_nodes.core.text_encoder import te_key_map
    p = paths(root)
    per: dict[str, int] = {}
    largest = 0
    for name, path in p.items():
        h = st_io.read_header(path)
        keys = list(h.tensors)
        if name == "te":
            keys = list(te_key_map(h.shapes(), "model."))
        per[name] = sum(h.tensors[k].nbytes for k in keys)
        largest = max(largest, max(h.tensors[k].nbytes for k in keys))
    return sum(per.values()), largest, per


def _sync(dev) -> None:
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def load_jobs(plan, dev) -> dict:
    """The three loader calls for ``plan`` to ``dev`` in bf16 through core/loader.py, each a call to time:
    "dit" (the DiT), "vae" (a ZImageVAE) and "te" (the text encoder, as its first use loads it)."""
    import torch
    from zimage_nodes.core import loader
    return {"dit": lambda: loader.load_dit(plan.dit, dev, torch.bfloat16, torch.bfloat16),
            "vae": lambda: loader.load_vae(plan.vae, dev, torch.bfloat16),
            "te": lambda: loader.LazyTextEncoder(plan.text_encoder, dev, torch.bfloat16, torch.bfloat16).get()}


def load_all(root: Path, device: str = "cuda:0") -> dict[str, float]:
    """Plan and load the three components to the device in bf16 through core/loader.py; seconds per stage."""
    import torch
    from zimage_nodes.core import loader
    dev = torch.device(device)
    p = paths(root)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    plan = loader.plan_single_files(p["dit"], p["te"], p["vae"], REPO)  # (the tokenizer is not loaded here)
    times["plan"] = time.perf_counter() - t0
    loaded = {}
    for name, job in load_jobs(plan, dev).items():
        t = time.perf_counter()
        loaded[name] = job()
        _sync(dev)
        times[name] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    dit, vae, te = loaded["dit"], loaded["vae"], loaded["te"]
    assert not any(t.is_meta or t.device != dev for m in (dit, vae.model, te) for t in m.parameters())
    del dit, vae, te, loaded
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return times


def measure(root: Path, cold: bool, device: str = "cuda:0"
            ) -> tuple[dict[str, float], PeakMemory, list[float | None]]:
    if cold:
        for path in paths(root).values():
            drop_cache(path)
    residency = [resident_fraction(path) for path in paths(root).values()]
    with PeakMemory() as mem:
        times = load_all(root, device)
    return times, mem, residency


# ---------------------------------------------------------------- report

def verdict(ratio: float) -> str:
    return "ok" if ratio <= 1.0 else "OVER"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where the full-size files are (written if missing)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown (and a .json) here")
    ap.add_argument("--disk-gb", type=float, default=8.0, help="bytes of the DiT file read for the disk rate")
    ap.add_argument("--warm-runs", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_load.py needs a CUDA GPU")
    torch.cuda.init()
    torch.zeros(1, device="cuda")  # context creation is not part of any timing

    gen_s = generate(args.dir)
    total, largest, per = streamed_bytes(args.dir)
    pinned, pageable = h2d_rates()
    disk, disk_read = disk_rate(paths(args.dir)["dit"], int(args.disk_gb * GB))

    cold_t, cold_mem, cold_res = measure(args.dir, cold=True)
    warm = [measure(args.dir, cold=False) for _ in range(max(1, args.warm_runs))]
    warm_t, warm_mem, warm_res = min(warm, key=lambda w: w[0]["total"])

    cold_limit = LIMIT_FACTOR * total / disk
    warm_limit = LIMIT_FACTOR * total / pinned
    rss_limit = largest + GB
    worst_anon = max(cold_mem.anon_above, warm_mem.anon_above)
    worst_rss = max(cold_mem.rss_above, warm_mem.rss_above)

    gpu = torch.cuda.get_device_name(0)
    written = f" (written in {gen_s:.0f} s this run)" if gen_s else ""
    lines = [
        f"GPU: {gpu}, torch {torch.__version__}, host {platform.node()}; files in {args.dir}{written}",
        "",
        f"Bytes streamed: {total / GB:.2f} GB (DiT {per['dit'] / GB:.2f}, text encoder without its last layer "
        f"{per['te'] / GB:.2f}, VAE {per['vae'] / GB:.3f}); largest tensor {largest / GB:.3f} GB.",
        f"Disk (sequential read of {disk_read / GB:.1f} GB of the DiT file, cache dropped): {disk / GB:.2f} GB/s. "
        f"H2D: pinned {pinned / GB:.1f} GB/s, pageable {pageable / GB:.1f} GB/s.",
        f"Page-cache residency before the cold load: {_res(cold_res)}; before the warm load: {_res(warm_res)}.",
        "",
        "| measure | value | limit | ratio | verdict |",
        "|---|---|---|---|---|",
        f"| cold load, all three (plan {cold_t['plan']:.2f} s, DiT {cold_t['dit']:.2f} s, TE {cold_t['te']:.2f} s, "
        f"VAE {cold_t['vae']:.2f} s) | {cold_t['total']:.2f} s ({total / cold_t['total'] / GB:.2f} GB/s) | "
        f"{cold_limit:.2f} s (1.3 x bytes / disk) | {cold_t['total'] / cold_limit:.2f} | "
        f"{verdict(cold_t['total'] / cold_limit)} |",
        f"| warm load, all three, best of {len(warm)} (plan {warm_t['plan']:.2f} s, DiT {warm_t['dit']:.2f} s, "
        f"TE {warm_t['te']:.2f} s, VAE {warm_t['vae']:.2f} s) | {warm_t['total']:.2f} s "
        f"({total / warm_t['total'] / GB:.2f} GB/s) | {warm_limit:.2f} s (1.3 x bytes / pinned H2D) | "
        f"{warm_t['total'] / warm_limit:.2f} | {verdict(warm_t['total'] / warm_limit)} |",
        f"| peak host anonymous RSS above baseline (cold {cold_mem.anon_above / GB:.2f}, warm "
        f"{warm_mem.anon_above / GB:.2f}) | {worst_anon / GB:.2f} GB | {rss_limit / GB:.2f} GB (largest tensor + 1 GB) "
        f"| {worst_anon / rss_limit:.2f} | {verdict(worst_anon / rss_limit)} |",
        f"| peak host RSS above baseline, incl. mapped page cache (cold {cold_mem.rss_above / GB:.2f}, warm "
        f"{warm_mem.rss_above / GB:.2f}) | {worst_rss / GB:.2f} GB | (for reference) | "
        f"{worst_rss / rss_limit:.2f} | - |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({
            "gpu": gpu, "torch": torch.__version__, "bytes": total, "largest_tensor": largest, "per_component": per,
            "disk_Bps": disk, "pinned_h2d_Bps": pinned, "pageable_h2d_Bps": pageable,
            "cold": cold_t, "warm": [w[0] for w in warm], "cold_peak_rss_above": cold_mem.rss_above,
            "cold_peak_anon_above": cold_mem.anon_above, "warm_peak_rss_above": warm_mem.rss_above,
            "warm_peak_anon_above": warm_mem.anon_above, "limits": {"cold_s": cold_limit, "warm_s": warm_limit,
                                                                    "anon_rss_bytes": rss_limit},
        }, indent=2) + "\n")


def _res(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "unknown (no fincore)"
    return ", ".join(f"{v:.0%}" for v in values) + " (DiT, TE, VAE)"


if __name__ == "__main__":
    main()
