"""GPU soak: 100 consecutive prompts of the low-VRAM workflow (8 GB policy) at 1024x1024 through the real
executor in-process, seed and prompt changing every time, the process capped at the budget; reports VRAM
(allocated, reserved) and host RSS after each prompt and the time per image, first ten against last ten.

    python bench/soak_gpu.py --weights /tmp/zw --prompts 100 --out bench/results/h200_soak.md
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SUBJECTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "a vintage bicycle", "a koi pond"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import psutil
    import torch
    from zimage_nodes.testing import weights
    from zimage_nodes.testing.comfy import InProcessComfy
    weights.ensure_single_files(args.weights / "models")
    comfy = InProcessComfy.get(args.weights)
    base = json.loads((REPO / "workflows/api/z_image_turbo_t2i_low_vram.json").read_text())
    base["5"]["inputs"]["vram_budget_gb"] = args.budget_gb
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.budget_gb * 1024 ** 3 / total)
    proc = psutil.Process()
    rows = []
    for i in range(args.prompts):
        p = copy.deepcopy(base)
        p["3"]["inputs"]["seed"] = 1000 + i
        p["2"]["inputs"]["text"] = f"{SUBJECTS[i % len(SUBJECTS)]}, variation {i}"
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = comfy.run(p)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if not r.success:
            print(f"prompt {i} failed: {r.error}")
            return 1
        rows.append({"i": i, "s": dt, "alloc_gb": torch.cuda.memory_allocated() / 2 ** 30,
                     "reserved_gb": torch.cuda.memory_reserved() / 2 ** 30,
                     "peak_gb": torch.cuda.max_memory_allocated() / 2 ** 30, "rss_gb": proc.memory_info().rss / 2 ** 30})
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[1:11], rows[-10:]  # prompt 0 loads the files

    def med(rs, k):
        return statistics.median(r[k] for r in rs)

    text = "\n".join([
        f"GPU soak: {args.prompts} prompts, low-VRAM workflow ({args.budget_gb:g} GB policy, process capped), "
        f"1024x1024, seed and prompt changing (text encoder streamed every prompt), {torch.cuda.get_device_name(0)}, "
        f"torch {torch.__version__}.", "",
        "| | prompts 2-11 (median) | last 10 (median) | change |", "|---|---|---|---|",
        *[f"| {label} | {med(first, k):.3f} | {med(last, k):.3f} | {med(last, k) - med(first, k):+.3f} |"
          for label, k in (("seconds per image", "s"), ("allocated after prompt, GB", "alloc_gb"),
                           ("reserved after prompt, GB", "reserved_gb"), ("peak allocated, GB", "peak_gb"),
                           ("host RSS, GB", "rss_gb"))],
        "", f"max peak over all prompts: {max(r['peak_gb'] for r in rows):.2f} GB (budget {args.budget_gb:g} GB)"])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
