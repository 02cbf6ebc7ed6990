"""GPU sweep of the parallel reader (core/fastread.py): the three full-size files, warm (page cache), read to
cuda:0 in their own dtype, for a few thread counts, chunk sizes and both modes (register, pread).

    python bench/read_sweep.py --weights /tmp/zw [--out sweep.json]

Each setting runs in a subprocess (the knobs are environment variables read per call, the registration
refusal is remembered per process); each reports the best of 3 reads and the reader's stats.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


SETTINGS = [  # (mode, threads, chunk MiB, in-flight budget GiB, registered chunks held per worker, drop pages)
    ("register", 8, 64, 1, 2, True), ("register", 8, 64, 1, 2, False), ("register", 1, 256, 1, 2, False),
    ("register", 1, 256, 1, 64, False), ("register", 2, 256, 1, 64, False), ("register", 4, 256, 1, 8, False),
    ("pread", 12, 64, 1, 2, False), ("pread", 16, 64, 1, 2, False)]


def child(root: Path, budget_gib: float) -> dict:
    import torch
    from zimage_nodes.core.fastread import ReadStats, read_tensors
    from zimage_nodes.core.st_io import read_header
    from zimage_nodes.testing import weights
    files = list(weights.single_files(root / "models").values())
    torch.empty(1, device="cuda")
    times, last = [], []
    for _ in range(3):
        keep, stats = [], []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for f in files:
            s = ReadStats()
            stats.append(s)
            keep += [t for _, t in read_tensors(f, list(read_header(f).tensors), "cuda", lambda n, i: None,
                                               budget_bytes=int(budget_gib * 2 ** 30), stats=s)]
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        last = stats
        del keep
    nbytes = sum(s.bytes for s in last)
    return {"best_s": min(times), "first_s": times[0], "gbps": nbytes / min(times) / 1e9, "bytes": nbytes,
            "stats": [{k: (v if isinstance(v, (int, float, str, type(None))) else str(v))
                       for k, v in vars(s).items()} for s in last]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--budget-gib", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--best-env", type=Path, help="write the fastest setting as shell exports here")
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.weights, args.budget_gib)), flush=True)
        return 0
    from zimage_nodes.testing import weights
    weights.ensure_single_files(args.weights / "models")
    for f in weights.single_files(args.weights / "models").values():  # into the page cache
        with open(f, "rb", buffering=0) as fh:
            buf = bytearray(64 << 20)
            while fh.readinto(buf):
                pass
    rows = []
    for mode, threads, chunk, budget, hold, drop in SETTINGS:
        env = dict(os.environ, ZIMAGE_LOAD_THREADS=str(threads), ZIMAGE_LOAD_CHUNK_MB=str(chunk),
                   ZIMAGE_FASTREAD="1" if mode == "register" else "pread", ZIMAGE_LOAD_HOLD_CHUNKS=str(hold),
                   ZIMAGE_LOAD_DROP_PAGES="1" if drop else "0")
        out = subprocess.run([sys.executable, __file__, "--weights", str(args.weights), "--child",
                              "--budget-gib", str(budget)], env=env, capture_output=True, text=True, timeout=300)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        row = {"mode": mode, "threads": threads, "chunk_mb": chunk, "budget_gib": budget, "hold": hold, "drop": drop,
               **(json.loads(line[7:]) if line else {"error": out.stderr[-1500:]})}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "stats"}),
              json.dumps(row.get("stats", [{}])[0])[:300], flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    best = min((r for r in rows if "best_s" in r), key=lambda r: r["best_s"], default=None)
    if best is not None and args.best_env:  # for a following benchmark in the same shell
        args.best_env.write_text(
            f"export ZIMAGE_FASTREAD={'1' if best['mode'] == 'register' else 'pread'} "
            f"ZIMAGE_LOAD_THREADS={best['threads']} ZIMAGE_LOAD_CHUNK_MB={best['chunk_mb']} "
            f"ZIMAGE_LOAD_HOLD_CHUNKS={best['hold']} ZIMAGE_LOAD_DROP_PAGES={int(best['drop'])}\n")
        print("best:", args.best_env.read_text().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
