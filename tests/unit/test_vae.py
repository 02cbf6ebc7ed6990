"""core.vae: config and key map from both layouts, equality with ComfyUI's own VAE, tiling, dtype rule."""
from __future__ import annotations


import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from zimage_nodes.core import vae as V
from zimage_nodes.core.errors import CheckpointError, InputError
from zimage_nodes.core.st_io import read_header

TINY_CHANNELS = [32, 32, 64, 64]
FULL_CHANNELS = [128, 256, 512, 512]


def diffusers_vae(channels: list[int], seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=channels, layers_per_block=2,
                         latent_channels=16, use_quant_conv=False, use_post_quant_conv=False).eval()


def to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers -> BFL (ae.safetensors) names with ComfyUI's converter, independent of ours."""
    import comfy.diffusers_convert
    return comfy.diffusers_convert.convert_vae_state_dict(dict(state))


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny(comfy_modules) -> dict[str, dict[str, torch.Tensor]]:
    diffusers = diffusers_vae(TINY_CHANNELS).state_dict()
    return {"diffusers": diffusers, "bfl": to_bfl(diffusers)}


def test_latent_scaling_round_trip():
    z = torch.randn(2, 16, 4, 4)
    assert torch.allclose(V.model_to_raw(V.raw_to_model(z)), z, atol=1e-6)
    assert V.raw_to_model(torch.tensor(V.SHIFT)).item() == 0.0
    assert (V.SCALE, V.SHIFT) == (0.3611, 0.1159)


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_config_from_both_layouts(tiny, layout):
    shapes = shapes_of(tiny[layout])
    assert V.vae_layout(shapes) == layout
    cfg = V.vae_config_from_shapes(shapes)
    assert cfg["block_out_channels"] == TINY_CHANNELS
    assert (cfg["layers_per_block"], cfg["latent_channels"], cfg["in_channels"], cfg["out_channels"]) == (2, 16, 3, 3)
    assert not cfg["use_quant_conv"] and not cfg["use_post_quant_conv"] and cfg["mid_block_add_attention"]
    assert (cfg["scaling_factor"], cfg["shift_factor"]) == (V.SCALE, V.SHIFT)
    prefixed = {"vae." + k: v for k, v in shapes.items()}
    assert V.vae_config_from_shapes(prefixed, "vae.") == cfg


def test_bfl_conversion_reproduces_the_diffusers_state(tiny):
    """BFL -> diffusers through diffusers' converter (driven from the header) inverts ComfyUI's
    diffusers -> BFL conversion exactly, attention 1x1 convs included."""
    key_map = V.vae_key_map(shapes_of(tiny["bfl"]))
    assert len(key_map) == len(tiny["bfl"]) == len(tiny["diffusers"])
    assert key_map["decoder.mid.attn_1.q.weight"] == "decoder.mid_block.attentions.0.to_q.weight"
    assert key_map["decoder.up.3.block.0.conv1.weight"] == "decoder.up_blocks.0.resnets.0.conv1.weight"
    converted = V.convert_vae_state(tiny["bfl"])
    assert converted.keys() == tiny["diffusers"].keys()
    for name, value in tiny["diffusers"].items():
        assert torch.equal(converted[name], value), name
    assert V.vae_key_map(shapes_of(tiny["diffusers"])) == {k: k for k in tiny["diffusers"]}


@pytest.mark.parametrize("scale", ["TINY", "FULL"])
def test_config_matches_the_shared_test_checkpoints(scale):
    """The BFL layout zimage_nodes.testing.weights writes (244 tensors at full size) is read completely."""
    weights = pytest.importorskip("zimage_nodes.testing.weights")
    spec = getattr(weights, scale).vae
    shapes = {t.name: tuple(t.shape) for t in weights.vae_tensors(spec)}
    cfg = V.vae_config_from_shapes(shapes)
    assert cfg["block_out_channels"] == list(spec.block_out_channels)
    assert len(V.vae_key_map(shapes)) == len(shapes)
    if scale == "FULL":
        assert len(shapes) == 244


def test_wrong_files_are_refused(tiny):
    sd_vae = {"decoder.conv_in.weight": (512, 4, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
              "encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}
    with pytest.raises(CheckpointError, match="16-channel") as e:
        V.vae_config_from_shapes(sd_vae)
    assert "4 latent channels" in e.value.found
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        V.vae_config_from_shapes({"model.layers.0.self_attn.q_proj.weight": (64, 64)})
    incomplete = shapes_of(tiny["bfl"])
    del incomplete["decoder.mid.attn_1.k.bias"]
    with pytest.raises(CheckpointError, match="does not match") as e:
        V.vae_key_map(incomplete)
    assert "decoder.mid_block.attentions.0.to_k.bias" in e.value.found


def test_load_vae_streams_a_bfl_file(tiny, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tiny["bfl"].items()}, str(path))
    seen: list[tuple[int, int]] = []
    vae = V.load_vae([read_header(path)], device="cpu", dtype=torch.float32,
                     progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(tiny["bfl"]), len(tiny["bfl"]))
    state = vae.model.state_dict()
    for name, value in tiny["diffusers"].items():
        assert torch.equal(state[name], value.to(torch.bfloat16).float()), name


def test_full_size_decode_and_encode_equal_comfyui(comfy_modules):
    """The full-size Flux VAE (84M random parameters, fp32) through ZImageVAE and through
    ComfyUI's comfy.sd.VAE built from the same BFL state dict."""
    import comfy.sd
    bfl = to_bfl(diffusers_vae(FULL_CHANNELS).state_dict())
    assert len(bfl) == 244
    ours = V.ZImageVAE.from_state_dict(bfl)
    theirs = comfy.sd.VAE(sd=bfl, dtype=torch.float32)

    latent = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    image = ours.decode(latent)
    reference = theirs.decode(latent)
    assert image.shape == reference.shape == (1, 128, 128, 3) and image.dtype == torch.float32
    assert ((image > 0) & (image < 1)).float().mean() > 0.5  # not a saturated comparison
    assert (image - reference).abs().max() < 1 / 255  # measured 1.4e-6

    pixels = torch.rand(1, 64, 72, 3, generator=torch.Generator().manual_seed(2))
    encoded, reference = ours.encode(pixels), theirs.encode(pixels)
    assert encoded.shape == reference.shape == (1, 16, 8, 9)
    assert (encoded - reference).abs().max() < 1e-4  # measured 1.4e-6


@pytest.fixture(scope="module")
def tiny_vae(tiny) -> V.ZImageVAE:
    return V.ZImageVAE.from_state_dict(tiny["diffusers"])


def test_tiler_blends_exactly_and_without_seams():
    """The tiling machinery with stand-in models: a pointwise model is reproduced exactly; a model
    that shifts each tile by its own mean (like GroupNorm statistics do) leaves a step at a hard cut
    but only a ramp (steps of at most shift/(overlap+1)) with blending."""
    def pointwise(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(t, scale_factor=8, mode="nearest") * 2 - 1

    def per_tile(t: torch.Tensor) -> torch.Tensor:
        return pointwise(t) + 4 * t.mean()

    def step(y: torch.Tensor) -> float:
        return max(y.diff(dim=-1).abs().max().item(), y.diff(dim=-2).abs().max().item())

    x = torch.linspace(0, 1, 40)[:, None] * torch.linspace(0, 1, 44)[None, :]
    x = x.expand(1, 2, 40, 44).contiguous()
    assert torch.allclose(V._tiled_apply(x, pointwise, tile=16, overlap=4, up=8, down=1), pointwise(x), atol=1e-6)
    natural = step(pointwise(x))
    assert step(V._tiled_apply(x, per_tile, tile=16, overlap=0, up=8, down=1)) > natural + 0.5
    assert step(V._tiled_apply(x, per_tile, tile=16, overlap=4, up=8, down=1)) < natural + 0.1

    def pool(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(t, 8)

    image = torch.rand(1, 3, 80, 96)
    assert torch.allclose(V._tiled_apply(image, pool, tile=32, overlap=8, up=1, down=8), pool(image), atol=1e-6)


def test_tiled_vae_matches_untiled(tiny_vae):
    latent = torch.randn(1, 16, 16, 12, generator=torch.Generator().manual_seed(3))
    full = tiny_vae.decode(latent)
    single = tiny_vae.decode_tiled(latent, tile_px=128, overlap_px=32)  # one tile covers it
    assert torch.allclose(single, full, atol=1e-6)
    tiled = tiny_vae.decode_tiled(latent, tile_px=64, overlap_px=16)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()
    # Random weights make GroupNorm statistics and mid-block attention differ per tile, so tiles
    # only approximate the whole; the tiler itself is exact (test above).
    assert (tiled - full).abs().mean() < 0.2  # measured 0.077

    pixels = full[:, :, :88]
    encoded = tiny_vae.encode(pixels)
    assert torch.allclose(tiny_vae.encode_tiled(pixels, tile_px=128, overlap_px=32), encoded, atol=1e-5)
    tiled_latent = tiny_vae.encode_tiled(pixels, tile_px=64, overlap_px=16)
    assert tiled_latent.shape == encoded.shape == (1, 16, 16, 11)
    assert (tiled_latent - encoded).abs().mean() < 0.75 * encoded.abs().mean()  # measured 0.15 vs 0.26


def test_fp16_is_refused_for_bf16(tiny):
    vae = V.ZImageVAE.from_state_dict(tiny["diffusers"], dtype=torch.float16)
    assert vae.dtype == torch.bfloat16 and next(vae.model.parameters()).dtype == torch.bfloat16
    assert len(vae.notes) == 1 and "bf16" in vae.notes[0]
    image = vae.decode(torch.randn(1, 16, 4, 4))
    assert image.dtype == torch.float32 and torch.isfinite(image).all()
    assert V.ZImageVAE.from_state_dict(tiny["diffusers"]).notes == []
    with pytest.raises(InputError, match="precision"):
        V.resolve_vae_dtype(torch.float8_e4m3fn)


def test_bad_inputs_are_refused(tiny_vae):
    with pytest.raises(InputError, match="not a Z-Image"):
        tiny_vae.decode(torch.randn(1, 4, 8, 8))
    with pytest.raises(InputError, match="cannot be encoded"):
        tiny_vae.encode(torch.rand(64, 64, 3))
    with pytest.raises(InputError, match="tile"):
        tiny_vae.decode_tiled(torch.randn(1, 16, 8, 8), tile_px=100, overlap_px=8)
    rgba = torch.rand(1, 21, 19, 4)  # alpha dropped, centre-cropped to 16x16 like ComfyUI
    assert tiny_vae.encode(rgba).shape == (1, 16, 2, 2)
