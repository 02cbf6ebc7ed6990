"""What the nodes do: the core's torch logic joined to ComfyUI through the bridge.

Node classes call one function of this module each. It holds no module-level state: the loaded
model (``ZImageModel``) travels between nodes on a ZIMAGE_MODEL socket and lives in ComfyUI's
output cache, so a second run of the same graph reads no file again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import comfy_bridge as bridge
from .core import loader, sampling, schedule
from .core import text_encoder as te_mod
from .core import vae as vae_mod
from .core.errors import InputError

MIN_SIDE, MAX_SIDE = 256, 2048


@dataclass
class ZImageModel:
    """The payload of a ZIMAGE_MODEL socket."""
    plan: loader.LoadPlan
    dit: torch.nn.Module
    dit_patcher: object
    dit_dtypes: tuple[torch.dtype, torch.dtype]
    vae: vae_mod.ZImageVAE
    vae_patcher: object
    te: loader.LazyTextEncoder
    cache: te_mod.EmbeddingCache
    notes: list[str] = field(default_factory=list)
    te_patcher: Optional[object] = None
    tokenizer: Optional[object] = None

    @property
    def cap_feat_dim(self) -> int:
        return self.dit.cap_embedder[1].weight.shape[1]


@dataclass
class ZImageConditioning:
    """The payload of a ZIMAGE_CONDITIONING socket: Qwen3 hidden_states[-2] for one prompt."""
    embeds: torch.Tensor  # [1, L, C] on the intermediate device
    prompt: str
    tokens: int
    truncated: bool
    te_identity: str


# ---------------------------------------------------------------- loading

def load_model(dit_name: str, text_encoder_name: str, vae_name: str, diffusers_folder: str,
               dit_device: str, dit_dtype: str, te_device: str, te_dtype: str,
               vae_device: str, vae_dtype: str, embedding_cache_dir: str = "") -> tuple[ZImageModel, str]:
    progress = bridge.Progress(4)
    if diffusers_folder and diffusers_folder != bridge.NONE:
        plan = loader.plan_diffusers_folder(bridge.resolve_diffusers_folder(diffusers_folder, "diffusers_folder"),
                                            bridge.comfy_tokenizer_dir())
    else:
        plan = loader.plan_single_files(bridge.resolve_file(bridge.DIT_FOLDER, dit_name, "dit_name"),
                                        bridge.resolve_file(bridge.TE_FOLDER, text_encoder_name, "text_encoder_name"),
                                        bridge.resolve_file(bridge.VAE_FOLDER, vae_name, "vae_name"),
                                        bridge.comfy_tokenizer_dir())
    tokenizer = te_mod.load_tokenizer(plan.tokenizer_dir)
    progress.update(1)
    notes = list(plan.notes)

    dev = bridge.resolve_device(dit_device, bridge.torch_device(), "dit_device")
    dit_storage, dit_compute = loader.choose_dtypes(dit_dtype, dev, "DiT", "dit_dtype", notes)
    bridge.free_memory(plan.dit.nbytes, dev)
    dit = loader.load_dit(plan.dit, dev, dit_storage, dit_compute)
    dit_patcher = bridge.make_patcher(dit, dev, dev)
    progress.update(2)

    vdev = bridge.resolve_device(vae_device, bridge.vae_device(), "vae_device")
    vae_storage, _ = loader.choose_dtypes(vae_dtype, vdev, "vae", "vae_dtype", notes)
    vae = loader.load_vae(plan.vae, vdev, vae_storage)
    vae_patcher = bridge.make_patcher(vae.model, vdev, vdev)
    progress.update(3)

    tdev = bridge.resolve_device(te_device, bridge.text_encoder_device(), "te_device")
    te_storage, te_compute = loader.choose_dtypes(te_dtype, tdev, "text encoder", "te_dtype", notes)
    te = loader.LazyTextEncoder(plan.text_encoder, tdev, te_storage, te_compute)
    cache = te_mod.EmbeddingCache(directory=Path(embedding_cache_dir) if embedding_cache_dir else None)
    progress.update(4)

    model = ZImageModel(plan, dit, dit_patcher, (dit_storage, dit_compute), vae, vae_patcher, te, cache, notes,
                        tokenizer=tokenizer)
    report = [f"DiT: {plan.dit.headers[0].path.name} ({plan.dit.layout}) on {dev}, "
              f"{_name(dit_storage)} storage / {_name(dit_compute)} compute",
              f"VAE: {plan.vae.headers[0].path.name} on {vdev}, {_name(vae_storage)}",
              f"Text encoder: {plan.text_encoder.headers[0].path.name} on {tdev}, loaded on first use "
              f"(last layer and final norm skipped)"] + notes
    text = "\n".join(report)
    bridge.info(text.replace("\n", "; "))
    return model, text


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------- text encoding

def encode_text(model: ZImageModel, text: str) -> tuple[ZImageConditioning, str]:
    ids, truncated = te_mod.tokenize(model.tokenizer, text)
    identity = model.te.identity
    embeds = model.cache.get(text, identity)
    note = "embedding cache hit"
    if embeds is None:
        first = model.te.module is None
        module = model.te.get()
        if first:
            model.te_patcher = bridge.make_patcher(module, model.te.device, model.te.device)
        bridge.load_on_device([model.te_patcher])
        bridge.check_interrupt()
        with torch.inference_mode():
            out = module(torch.tensor([ids], device=model.te.device))
        embeds = out.to(bridge.intermediate_device(), torch.float32)
        model.cache.put(text, identity, embeds)
        note = "encoded"
    msg = f"{len(ids)} tokens, {note}"
    if truncated:
        msg += f"; the prompt was longer than {te_mod.MAX_TOKENS} tokens and was truncated"
        bridge.warn(msg)
    return ZImageConditioning(embeds, text, len(ids), truncated, identity), msg


# ---------------------------------------------------------------- sampling

def snap_size(width: int, height: int, notes: list[str]) -> tuple[int, int]:
    for name, v in (("width", width), ("height", height)):
        if v < MIN_SIDE or v > MAX_SIDE:
            raise InputError(f"`{name}` = {v} is outside {MIN_SIDE}..{MAX_SIDE}.",
                             expected=f"{MIN_SIDE} <= {name} <= {MAX_SIDE}, a multiple of 16",
                             fix=("for larger images generate at up to 2048 and use the Z-Image Tiled Upscale "
                                  "node" if v > MAX_SIDE else f"use at least {MIN_SIDE}"))
    w, h = width // 16 * 16, height // 16 * 16
    if (w, h) != (width, height):
        notes.append(f"size snapped from {width}x{height} to {w}x{h} (multiples of 16)")
    return w, h


def _check_conditioning(model: ZImageModel, cond: ZImageConditioning, name: str) -> None:
    if cond.embeds.shape[-1] != model.cap_feat_dim:
        raise InputError(f"`{name}` was encoded by a text encoder of width {cond.embeds.shape[-1]}, "
                         f"but this DiT expects {model.cap_feat_dim}.",
                         fix="encode the prompt with the Z-Image Text Encode node fed by the same loader")


def sample(model: ZImageModel, positive: ZImageConditioning, width: int, height: int, seed: int, steps: int,
           schedule_name: str, shift: float, cfg: float, batch_size: int, max_batch: int, denoise: float,
           negative: Optional[ZImageConditioning] = None, latent: Optional[dict] = None,
           image: Optional[torch.Tensor] = None) -> tuple[dict, torch.Tensor, str]:
    notes: list[str] = []
    _check_conditioning(model, positive, "positive")
    if negative is not None:
        _check_conditioning(model, negative, "negative")
    if batch_size < 1:
        raise InputError(f"`batch_size` = {batch_size}.", expected=">= 1", fix="set batch_size to 1")
    sigmas = schedule.make_sigmas(schedule_name, steps, shift, denoise)

    x_init = None
    if image is not None or latent is not None:
        if image is not None and latent is not None:
            notes.append("both latent and image were connected; the latent is used")
        if latent is not None:
            raw = latent["samples"]
        else:
            raw = encode_image(model, image)
        if raw.ndim != 4 or raw.shape[1] != 16:
            raise InputError(f"`latent` has shape {tuple(raw.shape)}.", expected="[B, 16, H/8, W/8] (a Flux/Z-Image latent)",
                             fix="encode the image with this loader's VAE (connect the IMAGE input instead)")
        batch_size = raw.shape[0]
        x_init = vae_mod.raw_to_model(raw.float())
        lh, lw = raw.shape[2], raw.shape[3]
    else:
        w, h = snap_size(width, height, notes)
        lh, lw = h // 8, w // 8
    if denoise < 1.0 and x_init is None:
        notes.append("denoise < 1 without a latent or image input starts from noise (as core KSampler does)")

    dev = model.dit_patcher.load_device
    bridge.load_on_device([model.dit_patcher])
    noise = bridge.prepare_noise((batch_size, 16, lh, lw), seed).to(dev)
    if x_init is not None:
        x_init = x_init.to(dev)
    compute = model.dit_dtypes[1]
    cond = positive.embeds.to(dev, compute)
    uncond = negative.embeds.to(dev, compute) if negative is not None and cfg != 1.0 else None
    if negative is not None and cfg == 1.0:
        notes.append("cfg is 1, so the negative prompt is not used (Turbo needs no CFG)")

    def model_fn(x, s, cap):
        return model.dit(x, s, cap)

    n = len(sigmas) - 1
    progress = bridge.Progress(max(n, 1))

    def on_step(step: sampling.Step) -> None:
        preview = bridge.latent_preview(vae_mod.model_to_raw(step.x0)) if step.index % 2 == 0 else None
        progress.update(step.index + 1, preview)
        bridge.check_interrupt()

    with torch.inference_mode():
        if n == 0:
            x0 = x_init if x_init is not None else noise
        else:
            x0 = sampling.sample(model_fn, noise, sigmas, cond, uncond=uncond, cfg=cfg, x_init=x_init,
                                 max_batch=max_batch, callback=on_step)
        sampling.check_finite(x0, f"DiT compute dtype {_name(compute)}, storage {_name(model.dit_dtypes[0])}")
        raw = vae_mod.model_to_raw(x0)
        images = decode(model, raw)
    out_latent = {"samples": raw.to(bridge.intermediate_device(), torch.float32)}
    notes.insert(0, f"{n} DiT forwards, sigmas {[round(float(s), 4) for s in sigmas]}")
    return out_latent, images, "\n".join(notes)


def decode(model: ZImageModel, raw: torch.Tensor) -> torch.Tensor:
    bridge.load_on_device([model.vae_patcher])
    with torch.inference_mode():
        return model.vae.decode(raw).to(bridge.intermediate_device(), torch.float32)


def encode_image(model: ZImageModel, image: torch.Tensor) -> torch.Tensor:
    bridge.load_on_device([model.vae_patcher])
    if image.ndim != 4 or image.shape[-1] < 3 or image.shape[1] < 8 or image.shape[2] < 8:
        raise InputError(f"`image` has shape {tuple(image.shape)}.", expected="IMAGE [B, H, W, 3], at least 8x8",
                         fix="connect a LoadImage or VAE Decode output")
    h, w = image.shape[1] // 16 * 16, image.shape[2] // 16 * 16
    with torch.inference_mode():
        return model.vae.encode(image[:, :h, :w, :3]).float()
