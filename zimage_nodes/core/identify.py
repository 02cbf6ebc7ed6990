"""Classify a safetensors file by its key names and shapes alone (no tensor data is read).

Each detector looks for an anchor key under any prefix ("", "model.diffusion_model.", "vae.", ...) and
checks the structure around it, so scaled-down test files are recognised as well as the real ones. A
file holding several components is a full checkpoint; ``expect`` accepts it when the wanted component
is one of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Mapping

from .errors import CheckpointError
from .st_io import Header


class Kind(str, Enum):
    ZIMAGE_DIT = "zimage_dit"
    QWEN3_TE = "qwen3_te"
    FLUX_VAE = "flux_vae"
    LUMINA2_DIT = "lumina2_dit"
    FLUX_DIT = "flux_dit"
    SD3_DIT = "sd3_dit"
    SDXL_UNET = "sdxl_unet"
    SD_UNET = "sd_unet"          # SD1.x / SD2.x
    SD_VAE = "sd_vae"            # 4 latent channels (SD1.x / SD2.x / SDXL)
    OTHER_VAE = "other_vae"      # a KL VAE with another latent channel count
    CLIP_TE = "clip_te"
    T5_TE = "t5_te"
    OTHER_LLM = "other_llm"      # Qwen2.5, Gemma, Llama, Qwen3-MoE, ...
    LORA = "lora"
    FULL_CHECKPOINT = "full_checkpoint"
    UNKNOWN = "unknown"


@dataclass
class Identified:
    """What a file is. ``prefix`` precedes the component's own key names ("" or e.g.
    "model.diffusion_model."); ``layout`` names the key naming ("original"/"diffusers" for the DiT,
    "bfl"/"diffusers" for the VAE, "hf" for LLMs); ``parts`` lists the components of a full checkpoint."""
    kind: Kind
    prefix: str
    description: str
    layout: str = ""
    parts: tuple["Identified", ...] = ()


# What each of the pack's slots needs, and the node input that takes it.
EXPECTED: dict[Kind, str] = {
    Kind.ZIMAGE_DIT: "the Z-Image DiT (diffusion_models/z_image_turbo_bf16.safetensors)",
    Kind.QWEN3_TE: "the Qwen3-4B text encoder (text_encoders/qwen_3_4b.safetensors)",
    Kind.FLUX_VAE: "the Flux VAE (vae/ae.safetensors)",
}
SLOT_NAMES: dict[Kind, str] = {Kind.ZIMAGE_DIT: "Z-Image DiT", Kind.QWEN3_TE: "text encoder",
                               Kind.FLUX_VAE: "VAE"}
INPUTS: dict[Kind, str] = {Kind.ZIMAGE_DIT: "dit_name", Kind.QWEN3_TE: "text_encoder_name",
                           Kind.FLUX_VAE: "vae_name"}

_QWEN3_SIZES = {(1024, 28): "Qwen3-0.6B", (2048, 28): "Qwen3-1.7B", (2560, 36): "Qwen3-4B", (4096, 36): "Qwen3-8B",
                (5120, 40): "Qwen3-14B"}  # (hidden, layers)
_QUANT_AUX = ("scaled_fp8", ".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.", "lora_unet_", "lora_te", ".hada_w1_a")

Shapes = Mapping[str, tuple[int, ...]]
Detector = Callable[[Header, Shapes, str], "Identified | None"]


def _dim(shapes: Shapes, key: str, axis: int) -> int | None:
    shape = shapes.get(key)
    return shape[axis] if shape is not None and len(shape) > axis else None


def _count(shapes: Shapes, group: str) -> int:
    pat = re.compile(re.escape(group) + r"\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pat.match(k))})


def _prefixes(shapes: Shapes, anchor: str) -> list[str]:
    """Prefixes p ("" or ending in ".") such that p + anchor is a key."""
    out = []
    for key in shapes:
        if key.endswith(anchor):
            p = key[:-len(anchor)]
            if p == "" or p.endswith("."):
                out.append(p)
    return sorted(out, key=len)


def _precision(header: Header, prefix: str) -> str:
    """", fp8 e4m3fn" etc. when the component's matrices are stored in fp8."""
    f8 = sorted({i.dtype for k, i in header.tensors.items()
                 if k.startswith(prefix) and i.dtype.startswith("F8_") and len(i.shape) == 2})
    if not f8:
        return ""
    scaled = any(k.startswith(prefix) and k.endswith(_QUANT_AUX) for k in header.tensors)
    names = "/".join({"F8_E4M3": "e4m3fn", "F8_E5M2": "e5m2"}[d] for d in f8)
    return f", fp8 {names}{' scaled' if scaled else ''}"


# ---------------------------------------------------------------- detectors, one per family

def _nextdit(header: Header, s: Shapes, p: str) -> Identified | None:
    dim, cap = _dim(s, p + "cap_embedder.1.weight", 0), _dim(s, p + "cap_embedder.1.weight", 1)
    if dim is None or p + "x_embedder.weight" not in s:
        return None
    n = _count(s, p + "layers")
    adaln_in = _dim(s, p + "layers.0.adaLN_modulation.0.weight", 1)
    t_out = _dim(s, p + "t_embedder.mlp.2.weight", 0)
    if adaln_in == t_out == min(dim, 256) and p + "layers.0.attention.qkv.weight" in s:
        pads = "" if p + "cap_pad_token" in s else ", no pad tokens"
        return Identified(Kind.ZIMAGE_DIT, p, f"the Z-Image DiT (dim {dim}, {n} layers{pads}"
                                              f"{_precision(header, p)})", "original")
    if p + "layers.0.adaLN_modulation.1.weight" in s:
        return Identified(Kind.LUMINA2_DIT, p, f"a Lumina Image 2.0 DiT (dim {dim}, caption features {cap}, "
                                               f"{n} layers)", "original")
    return Identified(Kind.LUMINA2_DIT, p, f"a Lumina-family (NextDiT) DiT that is not Z-Image (dim {dim})",
                      "original")


def _zimage_diffusers(header: Header, s: Shapes, p: str) -> Identified | None:
    needed = ("layers.0.attention.to_q.weight", "cap_embedder.1.weight", "t_embedder.mlp.2.weight")
    if not all(p + k in s for k in needed):
        return None
    dim, n = _dim(s, p + "cap_embedder.1.weight", 0), _count(s, p + "layers")
    return Identified(Kind.ZIMAGE_DIT, p, f"the Z-Image DiT in diffusers naming (dim {dim}, {n} layers"
                                          f"{_precision(header, p)})", "diffusers")


def _flux_dit(header: Header, s: Shapes, p: str) -> Identified | None:
    return Identified(Kind.FLUX_DIT, p, f"a Flux DiT ({_count(s, p + 'double_blocks')} double blocks, "
                                        f"{_count(s, p + 'single_blocks')} single blocks)", "original")


def _flux_dit_diffusers(header: Header, s: Shapes, p: str) -> Identified | None:
    if p + "transformer_blocks.0.attn.to_q.weight" not in s:
        return None
    return Identified(Kind.FLUX_DIT, p, "a Flux DiT in diffusers naming", "diffusers")


def _sd3(header: Header, s: Shapes, p: str) -> Identified | None:
    return Identified(Kind.SD3_DIT, p, f"an SD3 MMDiT ({_count(s, p + 'joint_blocks')} joint blocks)", "original")


def _unet(header: Header, s: Shapes, p: str) -> Identified | None:
    if p + "label_emb.0.0.weight" in s:
        return Identified(Kind.SDXL_UNET, p, "an SDXL UNet", "original")
    return Identified(Kind.SD_UNET, p, "an SD1.x/SD2.x UNet", "original")


def _unet_diffusers(header: Header, s: Shapes, p: str) -> Identified | None:
    if p + "time_embedding.linear_1.weight" not in s or p + "conv_in.weight" not in s:
        return None
    if p + "add_embedding.linear_1.weight" in s:
        return Identified(Kind.SDXL_UNET, p, "an SDXL UNet in diffusers naming", "diffusers")
    return Identified(Kind.SD_UNET, p, "an SD1.x/SD2.x UNet in diffusers naming", "diffusers")


def _vae(header: Header, s: Shapes, p: str) -> Identified | None:
    conv_in = s.get(p + "decoder.conv_in.weight")
    if conv_in is None or p + "decoder.conv_out.weight" not in s:
        return None
    layout = "diffusers" if any(k.startswith(p + "decoder.up_blocks.") for k in s) else "bfl"
    names = {"bfl": "BFL layout", "diffusers": "diffusers naming"}
    ch = conv_in[1] if len(conv_in) > 1 else 0
    if len(conv_in) != 4:
        return Identified(Kind.OTHER_VAE, p, f"a video VAE ({ch} latent channels, {len(conv_in) - 2}-D convs)", layout)
    if ch == 16:
        return Identified(Kind.FLUX_VAE, p, f"a Flux VAE ({names[layout]}, 16 latent channels)", layout)
    if ch == 4:
        return Identified(Kind.SD_VAE, p, f"an SD1.x/SDXL VAE ({names[layout]}, 4 latent channels)", layout)
    return Identified(Kind.OTHER_VAE, p, f"a VAE with {ch} latent channels ({names[layout]})", layout)


def _qwen3(header: Header, s: Shapes, p: str) -> Identified | None:
    if p + "layers.0.mlp.gate_proj.weight" not in s and p + "layers.0.mlp.experts.0.gate_proj.weight" not in s:
        return None
    hidden = _dim(s, p + "layers.0.self_attn.q_proj.weight", 1)
    n = _count(s, p + "layers")
    if p + "layers.0.pre_feedforward_layernorm.weight" in s:
        return Identified(Kind.OTHER_LLM, p, f"a Gemma 3 language model (hidden {hidden}, {n} layers)", "hf")
    if p + "layers.0.mlp.experts.0.gate_proj.weight" in s:
        return Identified(Kind.OTHER_LLM, p, f"a Qwen3 mixture-of-experts model (hidden {hidden})", "hf")
    size = _QWEN3_SIZES.get((hidden or 0, n), "Qwen3")
    return Identified(Kind.QWEN3_TE, p, f"a {size} text encoder (hidden {hidden}, {n} layers"
                                        f"{_precision(header, p)})", "hf")


def _llm(header: Header, s: Shapes, p: str) -> Identified | None:
    if p + "layers.0.mlp.gate_proj.weight" not in s or p + "layers.0.self_attn.q_norm.weight" in s:
        return None
    hidden, n = _dim(s, p + "layers.0.self_attn.q_proj.weight", 1), _count(s, p + "layers")
    if p + "layers.0.pre_feedforward_layernorm.weight" in s:
        family = "a Gemma 2 language model"
    elif p + "layers.0.self_attn.q_proj.bias" in s:
        family = "a Qwen2/Qwen2.5 language model"
    else:
        family = "a Llama-family language model"
    return Identified(Kind.OTHER_LLM, p, f"{family} (hidden {hidden}, {n} layers)", "hf")


def _clip_hf(header: Header, s: Shapes, p: str) -> Identified | None:
    width = _dim(s, p + "text_model.encoder.layers.0.self_attn.q_proj.weight", 0)
    name = {768: "CLIP-L", 1024: "CLIP-H", 1280: "CLIP-G"}.get(width or 0, "CLIP")
    return Identified(Kind.CLIP_TE, p, f"a {name} text encoder (width {width})", "hf")


def _clip_openclip(header: Header, s: Shapes, p: str) -> Identified | None:
    width = _dim(s, p + "transformer.resblocks.0.attn.in_proj_weight", 1)
    name = {1024: "CLIP-H", 1280: "CLIP-G"}.get(width or 0, "CLIP")
    return Identified(Kind.CLIP_TE, p, f"a {name} text encoder (OpenCLIP naming, width {width})", "openclip")


def _t5(header: Header, s: Shapes, p: str) -> Identified | None:
    d = _dim(s, p + "encoder.block.0.layer.0.SelfAttention.q.weight", 1)
    name = "T5-XXL" if d == 4096 else "T5"
    return Identified(Kind.T5_TE, p, f"a {name} text encoder (d_model {d}, {_count(s, p + 'encoder.block')} blocks)",
                      "hf")


_DETECTORS: list[tuple[str, Detector]] = [
    ("cap_embedder.1.weight", _nextdit),
    ("all_x_embedder.2-1.weight", _zimage_diffusers),
    ("double_blocks.0.img_attn.qkv.weight", _flux_dit),
    ("single_transformer_blocks.0.attn.to_q.weight", _flux_dit_diffusers),
    ("joint_blocks.0.x_block.attn.qkv.weight", _sd3),
    ("input_blocks.0.0.weight", _unet),
    ("down_blocks.0.resnets.0.conv1.weight", _unet_diffusers),
    ("decoder.conv_in.weight", _vae),
    ("layers.0.self_attn.q_norm.weight", _qwen3),
    ("layers.0.self_attn.q_proj.weight", _llm),
    ("text_model.encoder.layers.0.self_attn.q_proj.weight", _clip_hf),
    ("transformer.resblocks.0.attn.in_proj_weight", _clip_openclip),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", _t5),
]


def _components(header: Header) -> list[Identified]:
    shapes = header.shapes()
    found: list[Identified] = []
    for anchor, detect in _DETECTORS:
        for p in _prefixes(shapes, anchor):
            ident = detect(header, shapes, p)
            if ident is not None:
                found.append(ident)
    return found


def _join(descriptions: list[str]) -> str:
    return descriptions[0] if len(descriptions) == 1 else ", ".join(descriptions[:-1]) + " and " + descriptions[-1]


def identify(header: Header) -> Identified:
    """Classify a file from its header (keys and shapes only)."""
    keys = list(header.tensors)
    lora_keys = sum(1 for k in keys if any(m in k for m in _LORA_MARKERS))
    if keys and lora_keys * 2 >= len(keys):
        return Identified(Kind.LORA, "", f"a LoRA ({lora_keys} LoRA tensors)")
    parts = _components(header)
    if len(parts) == 1:
        return parts[0]
    if parts:
        return Identified(Kind.FULL_CHECKPOINT, "", f"a full checkpoint holding {_join([p.description for p in parts])}",
                          parts=tuple(parts))
    sample = ", ".join(repr(k) for k in sorted(keys)[:3])
    return Identified(Kind.UNKNOWN, "", f"an unrecognised model ({len(keys)} tensors, e.g. {sample})"
                      if keys else "a safetensors file with no tensors")


def _label(header: Header) -> str:
    return str(header.path) if header.path.is_dir() else header.path.name


def expect(header: Header, kind: Kind, slot: str) -> Identified:
    """``identify`` and check the file is ``kind`` (or a full checkpoint containing it); ``slot`` is the node
    input the file was picked in. Raises CheckpointError naming the file, what it is and the fix."""
    ident = identify(header)
    if ident.kind == kind:
        return ident
    for part in ident.parts:
        if part.kind == kind:
            return Identified(kind, part.prefix, f"{part.description}, inside {ident.description}", part.layout,
                              ident.parts)
    name, want = _label(header), EXPECTED.get(kind, kind.value)
    other_slot = INPUTS.get(ident.kind)
    if other_slot is not None and other_slot != slot:
        fix = f"pick it in the `{other_slot}` input instead, and pick {want} in `{slot}`"
    elif ident.kind == Kind.LORA:
        fix = f"apply LoRAs with a LoRA node; pick {want} in `{slot}`"
    elif ident.kind == Kind.UNKNOWN:
        fix = f"pick {want} in `{slot}`; this file may be damaged or of a model this pack does not support"
    else:
        fix = f"this file belongs to another model; pick {want} in `{slot}`"
    slot_name = SLOT_NAMES.get(kind, kind.value)
    raise CheckpointError(f"{name} in the {slot_name} slot (`{slot}`) is {ident.description}.",
                          found=f"{len(header.tensors)} tensors, e.g. {', '.join(sorted(header.tensors)[:3])} "
                                f"({header.path})",
                          expected=want, fix=fix)
