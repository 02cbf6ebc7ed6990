"""ZImageTiledUpscale in the real ComfyUI: the shipped 4K workflow (shrunk), bad inputs, batches, a core
upscale model, and the denoise-0 VAE round trip. Tiny generated checkpoints, CPU."""
from __future__ import annotations

import copy
import dataclasses
import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.comfy_env import REPO
from zimage_nodes import upscaler
from zimage_nodes.core import vae as V

WORKFLOW = REPO / "workflows/api/z_image_turbo_t2i_4k_upscale.json"
LOADER = json.loads(WORKFLOW.read_text())["1"]


def test_the_node_is_registered_with_category_tooltips_and_description(comfy):
    from zimage_nodes import ids
    cls = comfy.node_class(ids.TILED_UPSCALE)
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[ids.TILED_UPSCALE] == "Z-Image Tiled Upscale"
    assert cls.CATEGORY == ids.CAT_IMAGE == "Z-Image/image"
    assert "batch" in cls.DESCRIPTION and "seed + i" in cls.DESCRIPTION
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_type, opts) in spec[section].items():
            assert opts.get("tooltip"), name
    assert spec["optional"]["upscale_model"][0] == "UPSCALE_MODEL" and spec["optional"]["policy"][0] == ids.T_POLICY
    assert spec["required"]["blend"][0] == ["feather", "cosine", "latent"]
    assert cls.RETURN_TYPES[0] == "IMAGE" and all(cls.OUTPUT_TOOLTIPS)


def test_the_4k_upscale_workflow_runs_with_sizes_shrunk(comfy):
    """The shipped API workflow, 256 -> 512 with tile 256 / overlap 64 (3x3 tiles of 224)."""
    prompt = json.loads(WORKFLOW.read_text())
    assert prompt["4"]["inputs"]["width"] == prompt["4"]["inputs"]["height"] == 4096
    assert prompt["3"]["inputs"]["width"] == 1024
    prompt["3"]["inputs"].update(width=256, height=256)
    prompt["4"]["inputs"].update(width=512, height=512, tile_size=256, overlap=64)
    result = comfy.run(prompt)
    assert result.success, result.error
    images = result.outputs["5"]["images"]
    assert len(images) == 1
    png = Image.open(comfy.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"])
    assert png.size == (512, 512)
    report = result.outputs["4"]["text"][0]
    assert "256x256 -> 512x512" in report and "9 tiles of 224x224 (3x3)" in report
    # progress over the tiles: 9 tiles x 8 DiT forwards, ending at the total
    totals = [(v, t) for (_n, v, t) in result.progress if t == 72]
    assert totals and totals[-1][0] == 72 and len(totals) >= 72


def _prompt(image: dict, **upscale) -> dict:
    inputs = dict(model=["1", 0], image=["6", 0], positive=["2", 0], scale_by=2.0, width=0, height=0,
                  tile_size=256, overlap=64, denoise=0.3, steps=3, seed=0, blend="feather")
    inputs.update(upscale)
    return {
        "1": copy.deepcopy(LOADER),
        "2": {"class_type": "ZImageTextEncode", "inputs": {"model": ["1", 0], "text": "a fox"}},
        "6": {"class_type": "EmptyImage", "inputs": dict(dict(width=64, height=64, batch_size=1, color=0x8040C0),
                                                          **image)},
        "4": {"class_type": "ZImageTiledUpscale", "inputs": inputs},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }


_SEED = iter(range(1000, 10 ** 6))


def _a_good_prompt_still_runs(comfy):
    result = comfy.run(_prompt({}, seed=next(_SEED)))   # a new seed, so the upscale really runs again
    assert result.success, result.error
    assert "64x64 -> 128x128" in result.outputs["4"]["text"][0]


@pytest.mark.parametrize("image,upscale,expected", [
    ({}, {"width": 9000},
     ["`width` = 9000", "Expected: 0 (use scale_by) or up to 8192", "Fix: set width to at most 8192"]),
    ({"width": 600, "height": 600}, {"scale_by": 16.0},
     ["`scale_by` = 16.0 asks for 9600x9600 from a 600x600 image", "at most 8192 pixels", "scale_by <= 13.65"]),
    ({}, {"tile_size": 256, "overlap": 192},
     ["`tile_size` = 256 is smaller than twice `overlap` = 192", "tile_size >= 2 x overlap",
      "raise tile_size to at least 384, or lower overlap to at most 128"]),
    ({}, {"overlap": 100}, ["`overlap` = 100 is not a multiple of 16", "Expected: 0, 16, 32",
                            "Fix: set overlap to 96 or 112"]),
    ({"width": 1, "height": 1}, {}, ["`image` is only 1x1 pixels", "at least 8x8", "Fix:"]),
], ids=["width_over_8192", "scale_by_over_8192", "tile_below_twice_overlap", "overlap_off_grid", "one_pixel"])
def test_bad_inputs_fail_clearly_and_comfyui_stays_up(comfy, image, upscale, expected):
    result = comfy.run(_prompt(image, **upscale))
    assert not result.success
    err = result.error
    assert err["node_type"] == "ZImageTiledUpscale" and err["exception_type"].endswith("InputError")
    for part in expected:
        assert part in err["exception_message"], err["exception_message"]
    _a_good_prompt_still_runs(comfy)


def test_interrupt_stops_between_tile_steps_and_the_next_prompt_runs(comfy):
    """Cancelling (as the UI's button does) after tile 4 stops the node there: 256 -> 512 is 9 tiles of
    one DiT forward (steps 2), so the bar's total is 9; nothing is reported after value 4."""
    import comfy.model_management as mm
    seen: list[int] = []

    def on_progress(node, value, total):
        if total == 9:
            seen.append(int(value))
            if value == 4:
                mm.interrupt_current_processing(True)

    result = comfy.run(_prompt({"width": 256, "height": 256}, steps=2, seed=next(_SEED)), on_progress=on_progress)
    assert result.interrupted and not result.success and result.error is None
    assert seen and max(seen) == 4
    _a_good_prompt_still_runs(comfy)


def test_previews_of_the_tile_being_refined_follow_the_preview_method(comfy, monkeypatch):
    import comfy.utils as comfy_utils
    from comfy.cli_args import LatentPreviewMethod, args
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    inner, previews = comfy_utils.PROGRESS_BAR_HOOK, []

    def hook(value, total, preview, prompt_id=None, node_id=None):
        if total == 9:
            previews.append(preview)
        inner(value, total, preview, prompt_id=prompt_id, node_id=node_id)

    comfy_utils.set_progress_bar_global_hook(hook)
    try:
        result = comfy.run(_prompt({"width": 256, "height": 256}, steps=2, seed=next(_SEED)))
    finally:
        comfy_utils.set_progress_bar_global_hook(inner)
    assert result.success, result.error
    frames = [p for p in previews if p is not None]
    assert len(frames) == 9 and frames[0][0] == "JPEG" and frames[0][1].size == (224 // 8, 224 // 8)


def test_an_empty_batch_is_refused_with_a_clear_message(comfy, loaded):
    """No core node makes an empty IMAGE, so the node is called directly here."""
    model, cond = loaded
    node = comfy.node_class("ZImageTiledUpscale")()
    with pytest.raises(Exception) as info:
        node.upscale(model, torch.zeros(0, 64, 64, 3), cond, 2.0, 0, 0, 256, 64, 0.3, 3, 0, "feather")
    assert "`image` is empty" in str(info.value) and "Fix:" in str(info.value)


def _preview_pixels(comfy, result, node="5") -> torch.Tensor:
    out = []
    for img in result.outputs[node]["images"]:
        path = comfy.base_dir / "temp" / img["subfolder"] / img["filename"]
        out.append(torch.from_numpy(np.array(Image.open(path))))
    return torch.stack(out)


def test_a_batch_is_upscaled_image_by_image_with_seed_plus_index(comfy):
    """Every image of a batch is processed (image i with seed + i): a batch of two equals the single
    runs with seeds 7 and 8 (the tiny model's random weights make the two seeds differ)."""
    batch = comfy.run(_prompt({"batch_size": 2}, seed=7, denoise=0.5))
    assert batch.success, batch.error
    assert "2 image(s) 64x64 -> 128x128" in batch.outputs["4"]["text"][0]
    pixels = _preview_pixels(comfy, batch)
    assert pixels.shape == (2, 128, 128, 3)
    single7 = _preview_pixels(comfy, comfy.run(_prompt({}, seed=7, denoise=0.5)))
    single8 = _preview_pixels(comfy, comfy.run(_prompt({}, seed=8, denoise=0.5)))
    assert torch.equal(pixels[0], single7[0]) and torch.equal(pixels[1], single8[0])
    assert not torch.equal(pixels[0], pixels[1])


def test_a_core_upscale_model_does_the_pixel_upscale(comfy):
    """A (tiny, random) RealESRGAN-Compact x2 file through core's Load Upscale Model."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact
    folder = comfy.base_dir / "models" / "upscale_models"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_file(Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2).state_dict(),
              str(folder / "tiny_compact_x2.safetensors"))
    prompt = _prompt({}, scale_by=3.0, denoise=0.0)
    prompt["7"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "tiny_compact_x2.safetensors"}}
    prompt["4"]["inputs"]["upscale_model"] = ["7", 0]
    result = comfy.run(prompt)
    assert result.success, result.error
    report = result.outputs["4"]["text"][0]
    assert "64x64 -> 192x192 (SRVGGNetCompact x2, then Lanczos 128x128 -> 192x192)" in report, report
    assert _preview_pixels(comfy, result).shape == (1, 192, 192, 3)


# ---------------------------------------------------------------- denoise 0: only the VAE round trip remains

@pytest.fixture(scope="module")
def loaded(comfy):
    inputs = {k: v for k, v in LOADER["inputs"].items()}
    model = comfy.node_class("ZImageLoader")().load(**inputs)["result"][0]
    cond = comfy.node_class("ZImageTextEncode")().encode(model, "a fox")["result"][0]
    return model, cond


class NoDiT(torch.nn.Module):
    """Stands in for the DiT and fails if it is ever called (it keeps the caption width check working)."""

    def __init__(self, real) -> None:
        super().__init__()
        self.cap_embedder = real.cap_embedder

    def forward(self, *a):
        raise AssertionError("the DiT ran at denoise 0")


class PointwiseAE(torch.nn.Module):
    """A VAE stand-in that works on each 8x8 block alone (pixel unshuffle + 1x1 convolutions): tiling
    cannot change its result, unlike a real VAE whose GroupNorm statistics and receptive field see the
    tile's borders."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.enc = torch.nn.Conv2d(192, 16, 1)
        self.dec = torch.nn.Conv2d(16, 192, 1)
        with torch.no_grad():
            self.enc.weight.copy_(torch.randn(16, 192, 1, 1, generator=g) * 0.1)
            self.dec.weight.copy_(torch.linalg.pinv(self.enc.weight[:, :, 0, 0])[:, :, None, None])
            self.dec.bias.copy_(-self.dec.weight[:, :, 0, 0] @ self.enc.bias)

    def encode(self, x):
        z = self.enc(F.pixel_unshuffle(x, 8))
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: z))

    def decode(self, z):
        return types.SimpleNamespace(sample=F.pixel_shuffle(self.dec(z), 8))


def _smooth_image(h: int, w: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    small = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).movedim(1, -1)


@pytest.mark.parametrize("blend", ["feather", "cosine", "latent"])
def test_denoise_0_equals_the_upscale_through_the_same_vae_untiled(loaded, blend):
    """With denoise 0 the pixel path skips the sampler (the DiT stand-in would fail) and the latent
    path runs no step, so the output is the Lanczos upscale after a VAE round trip. With a VAE that
    tiling cannot affect (8x8-block-local), the tiled result equals the untiled round trip of the
    same upscale to float32 rounding (far below 1/255): the tiling, padding, cropping and blending add
    nothing. 200x136 -> 400x272 is not a multiple of 16, so the edge padding is exercised too."""
    model, cond = loaded
    vae = V.ZImageVAE(PointwiseAE())
    m = dataclasses.replace(model, vae=vae, dit=NoDiT(model.dit))
    image = _smooth_image(136, 200)
    out, report = upscaler.upscale(m, image, cond, 2.0, 0, 0, 256, 64, 0.0, 9, 0, blend)
    assert out.shape == (1, 272, 400, 3) and "tiles of" in report and "VAE round trip only" in report
    big = upscaler.pad_to_grid(upscaler.lanczos(image, 400, 272))
    expected = vae.decode(vae.encode(big))[:, :272, :400]
    assert (out - expected).abs().max() <= 1e-5


def test_denoise_0_with_the_real_tiny_vae(loaded):
    """The real (tiny, random) VAE. When the image fits one tile the result equals the untiled round
    trip exactly. With 2 tiles it differs where the VAE sees tile borders (GroupNorm statistics of
    the tile instead of the image, zero padding at the tile's edge): a property of the VAE, not of
    the blending. With these random weights that difference is large (mean ~0.12 of the 0..1 range;
    a trained VAE's tiles agree far better), so the check is that it is no larger than the VAE's own
    tiled encode/decode (core.vae's tiler, same tile and overlap) gives."""
    model, cond = loaded
    m = dataclasses.replace(model, dit=NoDiT(model.dit))
    image = _smooth_image(64, 64)
    big = upscaler.lanczos(image, 128, 128)
    one_tile, report = upscaler.upscale(m, image, cond, 2.0, 0, 0, 256, 64, 0.0, 9, 0, "feather")
    assert "1 tiles of 128x128" in report
    assert (one_tile - model.vae.decode(model.vae.encode(big))).abs().max() <= 1e-5
    image = _smooth_image(96, 160)
    big = upscaler.lanczos(image, 320, 192)
    tiled, report = upscaler.upscale(m, image, cond, 2.0, 0, 0, 256, 64, 0.0, 9, 0, "feather")
    assert "2 tiles of 192x192" in report
    untiled = model.vae.decode(model.vae.encode(big))
    ours = float((tiled - untiled).abs().mean())
    vae_tiler = float((model.vae.decode_tiled(model.vae.encode_tiled(big, 192, 64), 192, 64) - untiled).abs().mean())
    assert ours <= 1.1 * vae_tiler, (ours, vae_tiler)
