"""The one module that talks to ComfyUI: model folders, progress, interruption, noise and model
management. Everything else in the pack is plain torch and can run without ComfyUI.

Imports of ComfyUI happen inside functions, so importing this module never requires ComfyUI.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Optional

import torch

from .core.errors import CheckpointError, InputError

log = logging.getLogger("zimage")
PREFIX = "[Z-Image]"

# ComfyUI model folders the pack reads (names of folder_paths entries).
DIT_FOLDER = "diffusion_models"
TE_FOLDER = "text_encoders"
VAE_FOLDER = "vae"
DIFFUSERS_FOLDER = "diffusers"
NONE = "none"


def info(msg: str) -> None:
    """Log through ComfyUI's logging (it prints %(message)s), prefixed with the pack's name."""
    logging.info(f"{PREFIX} {msg}")


def warn(msg: str) -> None:
    logging.warning(f"{PREFIX} {msg}")


# ---------------------------------------------------------------- model folders

def list_files(folder: str) -> list[str]:
    import folder_paths
    return folder_paths.get_filename_list(folder)


def list_diffusers_folders() -> list[str]:
    """Sub-folders of models/diffusers (every configured path) that hold a model_index.json."""
    import folder_paths
    found: set[str] = set()
    for base in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                found.add(os.path.relpath(root, base))
                dirs[:] = []  # its sub-folders are its components, not more models
    return sorted(found)


def resolve_file(folder: str, name: str, input_name: str) -> Path:
    """Full path of a file picked in a combo; a clear error when it is not in ComfyUI's folder list."""
    import folder_paths
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths(folder)) or "(no folder configured)"
        raise CheckpointError(
            f"`{input_name}`: '{name}' is not in ComfyUI's '{folder}' model folders.",
            found=f"searched {searched}",
            expected=f"a .safetensors file inside models/{folder} (or a folder added for '{folder}' in "
                     "extra_model_paths.yaml)",
            fix=f"put the file into models/{folder} and press 'r' in ComfyUI to refresh the lists, "
                "or pick a listed file")
    return Path(path)


def resolve_diffusers_folder(name: str, input_name: str) -> Path:
    import folder_paths
    for base in folder_paths.get_folder_paths(DIFFUSERS_FOLDER):
        candidate = Path(base) / name
        if (candidate / "model_index.json").is_file():
            return candidate
    raise CheckpointError(
        f"`{input_name}`: diffusers folder '{name}' was not found.",
        found="searched " + ", ".join(folder_paths.get_folder_paths(DIFFUSERS_FOLDER)),
        expected="a folder with model_index.json under models/diffusers (e.g. models/diffusers/Z-Image-Turbo)",
        fix="copy the Tongyi-MAI/Z-Image-Turbo folder there, or choose 'none' to use single files")


def comfy_tokenizer_dir() -> Path:
    """The Qwen BPE tokenizer files ComfyUI ships (same ids as Z-Image's Qwen3 tokenizer)."""
    import comfy.text_encoders.z_image as z
    return Path(z.__file__).resolve().parent / "qwen25_tokenizer"


# ---------------------------------------------------------------- progress and interruption

class Progress:
    """A ComfyUI progress bar for the running node (also checks for interruption on update)."""

    def __init__(self, total: int) -> None:
        import comfy.utils
        self.total = max(1, int(total))
        self._bar = comfy.utils.ProgressBar(self.total)

    def update(self, value: int, preview: Optional[object] = None) -> None:
        self._bar.update_absolute(value, self.total, preview)


def check_interrupt() -> None:
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


def live_previewer(device: torch.device):
    """ComfyUI's own live preview for the Flux latent format, as core samplers get it: None when the
    preview method is "none" (0.3.75's default; --preview-method, or the per-prompt choice newer
    frontends send), else a function from a model-space x0 [B,16,h,w] to a preview tuple for
    ProgressBar.update_absolute (latent2rgb, or TAESD when taef1 is in models/vae_approx)."""
    import comfy.latent_formats
    import latent_preview
    previewer = latent_preview.get_previewer(device, comfy.latent_formats.Flux())
    if previewer is None:
        return None
    return lambda x0: previewer.decode_latent_to_preview_image("JPEG", x0)


def prepare_noise(shape: Iterable[int], seed: int) -> torch.Tensor:
    """Initial noise drawn exactly as core samplers draw it, so a seed means the same image."""
    import comfy.sample
    return comfy.sample.prepare_noise(torch.zeros(tuple(shape)), seed)


# ---------------------------------------------------------------- devices and model management

def torch_device() -> torch.device:
    import comfy.model_management as mm
    return mm.get_torch_device()


def text_encoder_device() -> torch.device:
    import comfy.model_management as mm
    return mm.text_encoder_device()


def vae_device() -> torch.device:
    import comfy.model_management as mm
    return mm.vae_device()


def offload_device() -> torch.device:
    import comfy.model_management as mm
    return mm.unet_offload_device()


def intermediate_device() -> torch.device:
    import comfy.model_management as mm
    return mm.intermediate_device()


def resolve_device(choice: str, default: torch.device, input_name: str) -> torch.device:
    """'auto' -> ComfyUI's choice for that component; 'cpu'; 'cuda:N' (checked to exist)."""
    if choice == "auto":
        return default
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        dev = torch.device(choice)
        if not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count():
            n = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise InputError(f"`{input_name}` asks for {choice}, which this machine does not have.",
                             found=f"{n} CUDA device(s)", expected="auto, cpu or an existing cuda:N",
                             fix="choose auto")
        return dev
    raise InputError(f"`{input_name}`: unknown device '{choice}'.", expected="auto, cpu or cuda:N",
                     fix="choose auto")


def device_choices() -> list[str]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(n)]


class _Holder(torch.nn.Module):
    """A plain module around a component, so ModelPatcher can set its ``device`` attribute
    (diffusers' ModelMixin has a read-only one)."""

    def __init__(self, inner: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.device = device


def make_patcher(module: torch.nn.Module, load_device: torch.device, current_device: torch.device):
    """Hand a component to ComfyUI's model management (a ModelPatcher it can load and evict)."""
    import comfy.model_patcher
    holder = _Holder(module, current_device)
    return comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device())


def load_on_device(patchers: list, memory_required: int = 0) -> None:
    """Ask ComfyUI to make room and load these components fully on their load device."""
    import comfy.model_management as mm
    mm.load_models_gpu(patchers, memory_required=memory_required, force_full_load=True)


def register_loaded(patcher) -> None:
    """Hand ComfyUI a component we streamed onto its load device ourselves: it is entered in
    ``current_loaded_models`` with its whole size counted as resident, so ComfyUI sees the memory it
    holds and can offload it to make room for other models, and nothing is moved or copied now.
    (0.3.75's ModelPatcher keeps the resident size in ``model_loaded_weight_memory`` and skips loading a
    model whose weights carry its ``patches_uuid``; without those attributes this is a plain full load.)"""
    import comfy.model_management as mm
    holder = patcher.model
    if hasattr(holder, "model_loaded_weight_memory") and hasattr(holder, "current_weight_patches_uuid"):
        holder.model_loaded_weight_memory = patcher.model_size()
        holder.current_weight_patches_uuid = patcher.patches_uuid
        holder.model_lowvram = False
    mm.load_models_gpu([patcher], force_full_load=True)


def forget(patchers: list) -> None:
    """Take components that are being dropped (a load that failed or was cancelled) out of
    ``current_loaded_models`` without moving their weights anywhere."""
    import comfy.model_management as mm
    targets = [p for p in patchers if p is not None]
    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if any(loaded.model is p for p in targets):
            mm.current_loaded_models.pop(i)
            if loaded.model_finalizer is not None:
                loaded.model_finalizer.detach()


def free_memory(bytes_needed: int, device: torch.device) -> None:
    import comfy.model_management as mm
    mm.free_memory(bytes_needed, device)


def soft_empty_cache() -> None:
    import comfy.model_management as mm
    mm.soft_empty_cache()


# ---------------------------------------------------------------- memory policy (budget, flags, unloading)

def vram_flags() -> dict[str, bool]:
    """ComfyUI's command-line memory flags."""
    from comfy.cli_args import args
    return {"gpu_only": bool(args.gpu_only), "highvram": bool(args.highvram), "lowvram": bool(args.lowvram),
            "novram": bool(args.novram), "cpu": bool(args.cpu)}


def free_vram(device: torch.device) -> int:
    """What ComfyUI's model management says is free on the device, minus its reserve (--reserve-vram)."""
    import comfy.model_management as mm
    return max(0, int(mm.get_free_memory(device)) - int(mm.extra_reserved_memory()))


def total_vram(device: torch.device) -> int:
    import comfy.model_management as mm
    return int(mm.get_total_memory(device))


def unload(patchers: list) -> None:
    """Take these components off their device through ComfyUI's model management (others stay)."""
    import comfy.model_management as mm
    targets = [p for p in patchers if p is not None]
    for i in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[i]
        if any(loaded.model is p for p in targets):
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
    mm.soft_empty_cache()


# ---------------------------------------------------------------- VRAM monitor: per-node progress events, HTTP route
# ComfyUI (0.3.75 and later) makes a new progress registry for every prompt (comfy_execution/progress.py,
# reset_progress_state) and calls each registered handler's start_handler / finish_handler around every
# node. We register a handler through its public add_progress_handler; it lives for one prompt.

_PROGRESS_ADAPTER = None   # the handler class, built on first use


def _progress_adapter_class():
    """A comfy_execution.progress.ProgressHandler that forwards node events to a plain listener
    (``node_started(node_id, label)``, ``node_finished(node_id, label)``, ``reset()``). Built on first
    use so that importing this module never imports ComfyUI."""
    global _PROGRESS_ADAPTER
    if _PROGRESS_ADAPTER is not None:
        return _PROGRESS_ADAPTER
    from comfy_execution.progress import ProgressHandler

    class ZImageProgressAdapter(ProgressHandler):
        def __init__(self, name: str, listener) -> None:
            super().__init__(name)
            self.listener = listener
            self.registry = None

        def set_registry(self, registry) -> None:
            self.registry = registry

        def _label(self, node_id: str) -> str:
            try:
                return str(self.registry.dynprompt.get_node(node_id)["class_type"])
            except Exception:  # an ephemeral or unknown node: its id is label enough
                return str(node_id)

        def _call(self, fn, *args) -> None:
            # An error here would fail the user's node (the executor calls handlers inside its try):
            # stop listening for this prompt instead and say why.
            try:
                fn(*args)
            except Exception as e:
                self.disable()
                warn(f"VRAM monitor stopped recording this prompt: {type(e).__name__}: {e}")

        def start_handler(self, node_id, state, prompt_id) -> None:
            self._call(self.listener.node_started, node_id, self._label(node_id))

        def finish_handler(self, node_id, state, prompt_id) -> None:
            self._call(self.listener.node_finished, node_id, self._label(node_id))

        def reset(self) -> None:
            self._call(self.listener.reset)

    _PROGRESS_ADAPTER = ZImageProgressAdapter
    return _PROGRESS_ADAPTER


def progress_listener(name: str):
    """The listener registered under ``name`` for the running (or last) prompt, or None."""
    try:
        from comfy_execution.progress import get_progress_state
    except ImportError:
        return None
    handler = get_progress_state().handlers.get(name)
    return getattr(handler, "listener", None)


def add_progress_listener(name: str, listener) -> Optional[str]:
    """Register ``listener`` with the running prompt's progress registry; returns the prompt id, or
    None where this ComfyUI has no progress registry (then nothing is registered)."""
    try:
        from comfy_execution import progress
    except ImportError:
        return None
    progress.add_progress_handler(_progress_adapter_class()(name, listener))
    return str(progress.get_progress_state().prompt_id)


def add_get_route(path: str, payload) -> bool:
    """Serve GET ``path`` (and /api``path``) as JSON ``payload(query: dict) -> dict`` on the running ComfyUI
    server. Outside a ComfyUI server (tests, tools) it does nothing and returns False; it never imports
    ComfyUI's ``server`` module itself."""
    import sys
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    routes = getattr(instance, "routes", None)
    if routes is None:
        return False
    if any(getattr(r, "path", None) == path for r in routes):
        return True
    from aiohttp import web

    async def handler(request):
        return web.json_response(payload(dict(request.rel_url.query)))

    routes.get(path)(handler)
    return True


# ---------------------------------------------------------------- upscale models (ZImageTiledUpscale)

def upscale_with_model(upscale_model, image: torch.Tensor) -> torch.Tensor:
    """Run a core UPSCALE_MODEL (a spandrel ImageModelDescriptor from core's UpscaleModelLoader) over
    IMAGE [B,H,W,3] the way core's ImageUpscaleWithModel does (comfy_extras/nodes_upscale_model.py):
    free memory for it, 512 px tiles overlapping by 32 through comfy.utils.tiled_scale (result on the
    CPU), the tile halved on out-of-memory down to 128 px, the model put back on the CPU afterwards.
    Returns IMAGE [B, H*scale, W*scale, 3] clamped to 0..1."""
    import comfy.model_management as mm
    import comfy.utils
    device = mm.get_torch_device()
    memory_required = mm.module_size(upscale_model.model)
    memory_required += (512 * 512 * 3) * image.element_size() * max(upscale_model.scale, 1.0) * 384.0
    memory_required += image.nelement() * image.element_size()
    mm.free_memory(memory_required, device)
    upscale_model.to(device)
    try:
        in_img = image.movedim(-1, -3).to(device)
        tile, overlap = 512, 32
        while True:
            try:
                steps = in_img.shape[0] * comfy.utils.get_tiled_scale_steps(
                    in_img.shape[3], in_img.shape[2], tile_x=tile, tile_y=tile, overlap=overlap)
                pbar = comfy.utils.ProgressBar(steps)
                with torch.inference_mode():
                    out = comfy.utils.tiled_scale(in_img, lambda a: upscale_model(a), tile_x=tile, tile_y=tile,
                                                  overlap=overlap, upscale_amount=upscale_model.scale, pbar=pbar)
                break
            except mm.OOM_EXCEPTION:
                tile //= 2
                if tile < 128:
                    raise
    finally:
        upscale_model.to("cpu")
    return torch.clamp(out.movedim(-3, -1), min=0.0, max=1.0)
