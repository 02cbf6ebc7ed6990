"""A profiled run for the README: the shipped low-VRAM workflow (8 GB policy) with the VRAM monitor at the
end, full-size random weights, the real executor in-process; writes the monitor's plot and report.

    python bench/vram_plot.py --weights /tmp/zw --out docs/images
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget-gb", type=float, default=8.0)
    args = ap.parse_args()
    import numpy as np
    import torch
    from PIL import Image
    from zimage_nodes.testing import weights
    from zimage_nodes.testing.comfy import InProcessComfy
    weights.ensure_single_files(args.weights / "models")
    comfy = InProcessComfy.get(args.weights)
    prompt = copy.deepcopy(json.loads((REPO / "workflows/api/z_image_turbo_t2i_low_vram.json").read_text()))
    prompt["5"]["inputs"]["vram_budget_gb"] = args.budget_gb
    prompt["7"] = {"class_type": "ZImageVRAMMonitor",
                   "inputs": {"value": ["3", 1], "plot_width": 1200, "plot_height": 520, "policy": ["5", 0]}}
    prompt["4"]["inputs"]["images"] = ["7", 0]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.budget_gb * 1024 ** 3 / total)
    comfy.run(prompt)  # warm-up: loads the files, encodes the prompt
    prompt["3"]["inputs"]["seed"] = 7
    result = comfy.run(prompt)
    if not result.success:
        print(result.error)
        return 1
    report = result.outputs["7"]["text"][0]
    print(report)
    plot = comfy.executor.caches.outputs.get("7").outputs[2][0][0]
    args.out.mkdir(parents=True, exist_ok=True)
    Image.fromarray((plot.numpy() * 255).round().astype(np.uint8)).save(args.out / "vram_plot_h200_8gb.png")
    (args.out / "vram_report_h200_8gb.txt").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
