"""The generated checkpoints are in the real layouts: ComfyUI's own loaders accept them.

ComfyUI's VAE and Qwen3 classes have fixed full-size configurations, so these tests write full-size
files (the VAE is 84M parameters; the Qwen3-4B text encoder is 8 GB and is marked slow)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.comfy_env import REPO, comfy_root


def test_core_vaeloader_loads_the_generated_flux_vae(comfy, tmp_path):
    from zimage_nodes.testing import weights
    path = comfy.base_dir / "models" / "vae" / "ae_full_size.safetensors"
    if not path.exists():
        weights.write_vae(path, "full", seed=1, dtype=torch.float32)
    vae = comfy.node_class("VAELoader")().load_vae("ae_full_size.safetensors")[0]
    assert vae.latent_channels == 16
    with torch.inference_mode():
        img = vae.decode(torch.randn(1, 16, 8, 8))
    assert img.shape[-3:] == (64, 64, 3) and torch.isfinite(img).all()


@pytest.mark.slow
def test_core_cliploader_loads_the_generated_qwen3_4b(tmp_path):
    """Full-size Qwen3-4B in a separate process (8 GB file, about 16 GB of RAM at peak)."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from zimage_nodes.testing.comfy import ensure_comfy_importable
ensure_comfy_importable(__import__('pathlib').Path({str(tmp_path)!r}))
from zimage_nodes.testing import weights
path = __import__('pathlib').Path({str(tmp_path)!r}) / 'qwen_3_4b.safetensors'
weights.write_te(path, "full", seed=2)
import comfy.sd
clip = comfy.sd.load_clip(ckpt_paths=[str(path)], clip_type=comfy.sd.CLIPType.LUMINA2)
print(type(clip.cond_stage_model).__name__, clip.tokenizer.__class__.__name__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200,
                         cwd=str(comfy_root()))
    assert out.returncode == 0, out.stderr[-4000:]
    assert "ZImageTokenizer" in out.stdout
