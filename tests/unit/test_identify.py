"""core.identify: every generated layout, real module key sets, crafted foreign files, and expect()'s errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from zimage_nodes.core.errors import CheckpointError
from zimage_nodes.core.identify import Kind, expect, identify
from zimage_nodes.core.st_io import DTYPES, Header, TensorInfo, read_header
from zimage_nodes.testing import weights

DIFFUSERS = Path("diffusers") / "Z-Image-Turbo"


def fake_header(shapes: dict[str, tuple[int, ...]], name: str = "model.safetensors",
                dtypes: dict[str, str] | None = None) -> Header:
    """A header in memory (identification reads nothing else)."""
    dtypes = dtypes or {}
    tensors = {k: TensorInfo(dtypes.get(k, "BF16"), tuple(s), math.prod(s) * DTYPES[dtypes.get(k, "BF16")][0])
               for k, s in shapes.items()}
    return Header(Path(name), tensors, {}, 0)


def merged(folder: Path) -> Header:
    """The shards of a diffusers sub-folder as one header, as the loader builds it."""
    headers = [read_header(p) for p in sorted(folder.glob("*.safetensors"))]
    return Header(folder, {k: v for h in headers for k, v in h.tensors.items()}, {},
                  sum(h.file_size for h in headers))


def prefixed(header: Header, prefix: str) -> dict[str, tuple[int, ...]]:
    return {prefix + k: s for k, s in header.shapes().items()}


# ---------------------------------------------------------------- the generated layouts

@pytest.mark.parametrize("rel, kind, prefix, layout, words", [
    ("diffusion_models/z_image_turbo_bf16.safetensors", Kind.ZIMAGE_DIT, "", "original", "Z-Image DiT (dim 256, 2 layers)"),
    ("diffusion_models/z_image_turbo_fp8_e4m3fn.safetensors", Kind.ZIMAGE_DIT, "", "original", "fp8 e4m3fn"),
    ("diffusion_models/z_image_turbo_prefixed.safetensors", Kind.ZIMAGE_DIT, "model.diffusion_model.", "original",
     "Z-Image DiT"),
    ("text_encoders/qwen_3_4b.safetensors", Kind.QWEN3_TE, "model.", "hf", "Qwen3 text encoder (hidden 64, 3 layers"),
    ("vae/ae.safetensors", Kind.FLUX_VAE, "", "bfl", "Flux VAE (BFL layout, 16 latent channels)"),
    (str(DIFFUSERS / "vae" / "diffusion_pytorch_model.safetensors"), Kind.FLUX_VAE, "", "diffusers", "diffusers naming"),
])
def test_generated_single_files(tiny_models: Path, rel: str, kind: Kind, prefix: str, layout: str, words: str) -> None:
    ident = identify(read_header(tiny_models / rel))
    assert (ident.kind, ident.prefix, ident.layout) == (kind, prefix, layout)
    assert words in ident.description
    assert expect(read_header(tiny_models / rel), kind, "slot") == ident


@pytest.mark.parametrize("sub, kind, prefix, layout", [
    ("transformer", Kind.ZIMAGE_DIT, "", "diffusers"),
    ("text_encoder", Kind.QWEN3_TE, "model.", "hf"),
])
def test_generated_diffusers_shards(tiny_models: Path, sub: str, kind: Kind, prefix: str, layout: str) -> None:
    ident = expect(merged(tiny_models / DIFFUSERS / sub), kind, f"diffusers_folder/{sub}")
    assert (ident.kind, ident.prefix, ident.layout) == (kind, prefix, layout)


def test_diffusers_folder_text_encoder_without_model_prefix(tiny_models: Path) -> None:
    h = read_header(tiny_models / "text_encoders" / "qwen_3_4b.safetensors")
    bare = fake_header({k.removeprefix("model."): s for k, s in h.shapes().items()})
    assert expect(bare, Kind.QWEN3_TE, "text_encoder_name").prefix == ""


def test_scaled_fp8_repack_accepted(tiny_models: Path) -> None:
    h = read_header(tiny_models / "diffusion_models" / "z_image_turbo_fp8_e4m3fn.safetensors")
    shapes = h.shapes()
    shapes.update({"scaled_fp8": (0,), "layers.0.attention.qkv.scale_weight": (1,)})
    dtypes = {k: v.dtype for k, v in h.tensors.items()}
    ident = expect(fake_header(shapes, dtypes=dtypes), Kind.ZIMAGE_DIT, "dit_name")
    assert ident.prefix == "" and "fp8 e4m3fn scaled" in ident.description


def test_full_size_diffusers_transformer_keys() -> None:
    from diffusers import ZImageTransformer2DModel
    with torch.device("meta"):
        model = ZImageTransformer2DModel(axes_lens=[1536, 512, 512])
    ident = identify(fake_header({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    assert (ident.kind, ident.layout) == (Kind.ZIMAGE_DIT, "diffusers")
    assert "dim 3840, 30 layers" in ident.description


def test_real_lumina2_module_is_not_zimage(comfy_modules: Path) -> None:
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT
    cfg = dict(patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=26, qk_norm=True, n_heads=24,
               n_kv_heads=8, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512], rope_theta=10000.0,
               ffn_dim_multiplier=4.0)  # comfy/model_detection.py, the Lumina 2 branch
    model = NextDiT(**cfg, operations=comfy.ops.disable_weight_init, device="meta")
    shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    ident = identify(fake_header(shapes, "lumina_2_model_bf16.safetensors"))
    assert (ident.kind, ident.prefix) == (Kind.LUMINA2_DIT, "model.diffusion_model.")
    with pytest.raises(CheckpointError) as e:
        expect(fake_header(shapes, "lumina_2_model_bf16.safetensors"), Kind.ZIMAGE_DIT, "dit_name")
    assert "lumina_2_model_bf16.safetensors in the Z-Image DiT slot (`dit_name`) is a Lumina Image 2.0 DiT" in str(e.value)


def test_real_comfy_qwen3_4b_module(comfy_modules: Path) -> None:
    import comfy.ops
    from comfy.text_encoders.llama import Qwen3_4B
    model = Qwen3_4B({}, None, "meta", comfy.ops.disable_weight_init)
    ident = identify(fake_header({k: tuple(v.shape) for k, v in model.state_dict().items()}, "qwen_3_4b.safetensors"))
    assert (ident.kind, ident.prefix) == (Kind.QWEN3_TE, "model.")
    assert "Qwen3-4B text encoder (hidden 2560, 36 layers)" in ident.description


# ---------------------------------------------------------------- wrong slot and foreign files

def test_vae_in_dit_slot(tiny_models: Path) -> None:
    with pytest.raises(CheckpointError) as e:
        expect(read_header(tiny_models / "vae" / "ae.safetensors"), Kind.ZIMAGE_DIT, "dit_name")
    msg = str(e.value)
    assert "ae.safetensors in the Z-Image DiT slot (`dit_name`) is a Flux VAE (BFL layout" in msg
    assert "Expected: the Z-Image DiT (diffusion_models/z_image_turbo_bf16.safetensors)" in msg
    assert "Fix: pick it in the `vae_name` input instead" in msg


@pytest.mark.parametrize("rel, kind, slot, other", [
    ("text_encoders/qwen_3_4b.safetensors", Kind.FLUX_VAE, "vae_name", "text_encoder_name"),
    ("diffusion_models/z_image_turbo_bf16.safetensors", Kind.QWEN3_TE, "text_encoder_name", "dit_name"),
    ("vae/ae.safetensors", Kind.QWEN3_TE, "text_encoder_name", "vae_name"),
])
def test_swapped_slots(tiny_models: Path, rel: str, kind: Kind, slot: str, other: str) -> None:
    with pytest.raises(CheckpointError) as e:
        expect(read_header(tiny_models / rel), kind, slot)
    assert Path(rel).name in str(e.value) and f"pick it in the `{other}` input instead" in str(e.value)


SDXL_UNET = {"input_blocks.0.0.weight": (320, 4, 3, 3), "label_emb.0.0.weight": (1280, 2816),
             "time_embed.0.weight": (1280, 320), "out.2.weight": (4, 320, 3, 3)}
SD_VAE = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (8, 512, 3, 3),
          "quant_conv.weight": (8, 8, 1, 1), "decoder.conv_in.weight": (512, 4, 3, 3),
          "decoder.up.0.block.0.conv1.weight": (128, 256, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}
CLIP_L = {"text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
          "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
          "text_model.embeddings.token_embedding.weight": (49408, 768)}
CLIP_G_OPEN = {"transformer.resblocks.0.attn.in_proj_weight": (3840, 1280), "text_projection": (1280, 1280),
               "token_embedding.weight": (49408, 1280)}
FLUX = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "double_blocks.1.img_attn.qkv.weight": (9216, 3072),
        "single_blocks.0.linear1.weight": (21504, 3072), "img_in.weight": (3072, 64)}
LUMINA2 = {"x_embedder.weight": (2304, 64), "cap_embedder.0.weight": (2304,), "cap_embedder.1.weight": (2304, 2304),
           "t_embedder.mlp.2.weight": (1024, 1024), "layers.0.attention.qkv.weight": (3840, 2304),
           "layers.0.adaLN_modulation.1.weight": (9216, 1024), "noise_refiner.0.attention.qkv.weight": (3840, 2304),
           "context_refiner.0.attention.qkv.weight": (3840, 2304)}
T5XXL = {"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096),
         "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (10240, 4096), "shared.weight": (32128, 4096)}
GEMMA2 = {"model.embed_tokens.weight": (256000, 2304), "model.layers.0.self_attn.q_proj.weight": (2048, 2304),
          "model.layers.0.mlp.gate_proj.weight": (9216, 2304),
          "model.layers.0.pre_feedforward_layernorm.weight": (2304,), "model.norm.weight": (2304,)}
QWEN25_VL = {"model.embed_tokens.weight": (152064, 3584), "model.layers.0.self_attn.q_proj.weight": (3584, 3584),
             "model.layers.0.self_attn.q_proj.bias": (3584,), "model.layers.0.mlp.gate_proj.weight": (18944, 3584)}
QWEN3_8B = {"model.embed_tokens.weight": (151936, 4096), "model.norm.weight": (4096,),
            **{f"model.layers.{i}.{k}": s for i in range(36) for k, s in
               {"self_attn.q_proj.weight": (4096, 4096), "self_attn.q_norm.weight": (128,),
                "mlp.gate_proj.weight": (12288, 4096)}.items()}}


@pytest.mark.parametrize("name, shapes, kind, words", [
    ("sd_xl_unet.safetensors", SDXL_UNET, Kind.SDXL_UNET, "an SDXL UNet"),
    ("sdxl_unet_prefixed.safetensors", {"model.diffusion_model." + k: s for k, s in SDXL_UNET.items()},
     Kind.SDXL_UNET, "an SDXL UNet"),
    ("flux1-dev.safetensors", FLUX, Kind.FLUX_DIT, "a Flux DiT (2 double blocks, 1 single blocks)"),
    ("lumina_2.safetensors", LUMINA2, Kind.LUMINA2_DIT, "a Lumina Image 2.0 DiT (dim 2304"),
    ("sdxl_vae.safetensors", SD_VAE, Kind.SD_VAE, "4 latent channels"),
    ("clip_l.safetensors", CLIP_L, Kind.CLIP_TE, "a CLIP-L text encoder"),
    ("clip_g.safetensors", CLIP_G_OPEN, Kind.CLIP_TE, "a CLIP-G text encoder"),
    ("t5xxl_fp16.safetensors", T5XXL, Kind.T5_TE, "a T5-XXL text encoder"),
    ("gemma_2_2b.safetensors", GEMMA2, Kind.OTHER_LLM, "a Gemma 2 language model"),
    ("qwen_2.5_vl_7b.safetensors", QWEN25_VL, Kind.OTHER_LLM, "a Qwen2/Qwen2.5 language model"),
    ("qwen_3_8b.safetensors", QWEN3_8B, Kind.QWEN3_TE, "a Qwen3-8B text encoder"),
])
def test_foreign_files(tmp_path: Path, name: str, shapes: dict, kind: Kind, words: str) -> None:
    header = read_header(weights.write_sparse(tmp_path / name, shapes))
    ident = identify(header)
    assert ident.kind == kind and words in ident.description
    for want, slot in ((Kind.ZIMAGE_DIT, "dit_name"), (Kind.FLUX_VAE, "vae_name")):
        if want != kind:
            with pytest.raises(CheckpointError) as e:
                expect(header, want, slot)
            assert f"{name} in the" in str(e.value) and words in str(e.value) and f"`{slot}`" in str(e.value)


def test_sdxl_full_checkpoint(tmp_path: Path) -> None:
    shapes = {**{"model.diffusion_model." + k: s for k, s in SDXL_UNET.items()},
              **{"first_stage_model." + k: s for k, s in SD_VAE.items()},
              **{"conditioner.embedders.0.transformer." + k: s for k, s in CLIP_L.items()},
              **{"conditioner.embedders.1.model." + k: s for k, s in CLIP_G_OPEN.items()}}
    header = read_header(weights.write_sparse(tmp_path / "sd_xl_base_1.0.safetensors", shapes))
    ident = identify(header)
    assert ident.kind == Kind.FULL_CHECKPOINT
    assert sorted(p.kind for p in ident.parts) == sorted([Kind.SDXL_UNET, Kind.SD_VAE, Kind.CLIP_TE, Kind.CLIP_TE])
    assert {p.prefix for p in ident.parts} == {"model.diffusion_model.", "first_stage_model.",
                                               "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."}
    with pytest.raises(CheckpointError) as e:
        expect(header, Kind.ZIMAGE_DIT, "dit_name")
    assert "is a full checkpoint holding an SDXL UNet" in str(e.value) and "belongs to another model" in str(e.value)


def test_zimage_full_checkpoint_parts_are_accepted(tiny_models: Path) -> None:
    dit = read_header(tiny_models / "diffusion_models" / "z_image_turbo_bf16.safetensors")
    te = read_header(tiny_models / "text_encoders" / "qwen_3_4b.safetensors")
    vae = read_header(tiny_models / "vae" / "ae.safetensors")
    header = fake_header({**prefixed(dit, "model.diffusion_model."), **prefixed(te, "text_encoders.qwen3_4b.transformer."),
                          **prefixed(vae, "vae.")}, "z_image_aio.safetensors")
    assert identify(header).kind == Kind.FULL_CHECKPOINT
    assert expect(header, Kind.ZIMAGE_DIT, "dit_name").prefix == "model.diffusion_model."
    assert expect(header, Kind.QWEN3_TE, "text_encoder_name").prefix == "text_encoders.qwen3_4b.transformer.model."
    vae_ident = expect(header, Kind.FLUX_VAE, "vae_name")
    assert (vae_ident.prefix, vae_ident.layout) == ("vae.", "bfl") and "inside a full checkpoint" in vae_ident.description


def test_lora_and_unknown() -> None:
    lora = fake_header({f"diffusion_model.layers.{i}.attention.qkv.lora_{ab}.weight": (16, 3840)
                        for i in range(3) for ab in "AB"}, "zimage_style_lora.safetensors")
    assert identify(lora).kind == Kind.LORA
    with pytest.raises(CheckpointError, match="apply LoRAs with a LoRA node"):
        expect(lora, Kind.ZIMAGE_DIT, "dit_name")
    unknown = fake_header({"foo.weight": (3, 3), "bar.bias": (3,)}, "mystery.safetensors")
    ident = identify(unknown)
    assert ident.kind == Kind.UNKNOWN and "'bar.bias'" in ident.description
    with pytest.raises(CheckpointError, match="mystery.safetensors in the VAE slot .* is an unrecognised model"):
        expect(unknown, Kind.FLUX_VAE, "vae_name")
    assert identify(fake_header({})).description == "a safetensors file with no tensors"
