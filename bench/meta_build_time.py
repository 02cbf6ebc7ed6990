"""CPU time of the loader's planning and meta builds for the full-size files (no GPU, no weights: sparse files
with the real keys and shapes are written to a temporary folder): the DiT's meta build, the text encoder's,
and the VAE's plan (key mapping + its meta model, what ``vae.load_vae`` builds once per load). Best of 5, ms.

    python bench/meta_build_time.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from zimage_nodes.core import dit as dit_mod, loader, text_encoder as te_mod, vae as vae_mod  # noqa: E402
from zimage_nodes.testing import weights as W  # noqa: E402


def meta_build_jobs(plan: loader.LoadPlan) -> dict[str, Callable[[], object]]:
    """The loader's meta builds for ``plan``, each a call to time (the shapes and configs they start from are
    derived here, outside the calls): the DiT's meta model, the text encoder's, and the VAE's plan (key
    mapping + its meta model, what ``vae.load_vae`` builds once per load)."""
    targets = loader.dit_targets(list(plan.dit.shapes), plan.dit.prefix, plan.dit.layout)
    dit_shapes = loader.original_shapes(plan.dit.shapes, targets)
    te_cfg = te_mod.qwen3_config_from_shapes(plan.text_encoder.shapes, plan.text_encoder.prefix)
    vae_shapes = {k: v for h in plan.vae.headers for k, v in h.shapes().items()}
    return {"dit_meta": lambda: dit_mod.meta_dit_from_shapes(dit_shapes, dtype=torch.bfloat16),
            "te_meta": lambda: te_mod.build_text_encoder(te_cfg, device="meta"),
            "vae_plan_build": lambda: vae_mod._plan(vae_shapes, plan.vae.prefix, torch.bfloat16)}


def main() -> int:
    full = W.SCALES["full"]
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, specs in (("dit", W.dit_tensors(full.dit)), ("te", W.te_tensors(full.te)),
                            ("vae", W.vae_tensors(full.vae))):
            files[name] = W.write_sparse(Path(tmp) / f"{name}.safetensors", {s.name: s.shape for s in specs})
        jobs = meta_build_jobs(loader.plan_single_files(files["dit"], files["te"], files["vae"], REPO))
        best: dict[str, float] = {}
        for _ in range(5):
            for name, job in jobs.items():
                t = time.perf_counter()
                job()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
    print({k: round(v * 1000, 1) for k, v in best.items()}, "ms, best of 5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
