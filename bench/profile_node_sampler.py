"""Where the sampler node's time goes under a budget (phase timers around the runtime's steps).

    python bench/profile_node_sampler.py --weights /tmp/zw --budget-gb 8
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    args = ap.parse_args()
    import torch
    from zimage_nodes.testing.comfy import InProcessComfy
    comfy = InProcessComfy.get(args.weights)
    # the pack as ComfyUI loaded it (its own module tree, not this script's import of zimage_nodes)
    mods = {name.rsplit(".", 1)[-1]: m for name, m in sys.modules.items()
            if ".zimage_nodes." in name and name.rsplit(".", 1)[-1] in ("policy_runtime", "runtime", "sampling")}
    policy_runtime, runtime, sampling = mods["policy_runtime"], mods["runtime"], mods["sampling"]
    times: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.synchronize()
                times[name] = times.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    session = policy_runtime.dit_session

    @contextlib.contextmanager
    def timed_session(model, plan):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with session(model, plan) as s:
            torch.cuda.synchronize()
            times["session enter"] = times.get("session enter", 0) + time.perf_counter() - t
            yield s
            torch.cuda.synchronize()
            t = time.perf_counter()
        torch.cuda.synchronize()
        times["session exit"] = times.get("session exit", 0) + time.perf_counter() - t

    policy_runtime.dit_session = timed_session
    sampling.sample = timed("sampling loop", sampling.sample)
    runtime.decode = timed("decode", runtime.decode)
    prompt = copy.deepcopy(json.loads((REPO / "workflows/api/z_image_turbo_t2i_low_vram.json").read_text()))
    prompt["5"]["inputs"]["vram_budget_gb"] = args.budget_gb
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.budget_gb * 1024 ** 3 / total)
    for seed in (1, 2, 3):
        prompt["3"]["inputs"]["seed"] = seed
        times.clear()
        t = time.perf_counter()
        r = comfy.run(prompt)
        wall = time.perf_counter() - t
        print(f"seed {seed}: success {r.success}, wall {wall:.2f}s, " +
              ", ".join(f"{k} {v:.2f}s" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
