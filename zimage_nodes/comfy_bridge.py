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
        for root, _dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" in files:
                found.add(os.path.relpath(root, base))
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


def latent_preview(x0_raw: torch.Tensor, max_size: int = 256):
    """A cheap preview of a raw Flux latent: ComfyUI's linear latent->RGB factors, as a JPEG tuple."""
    import comfy.latent_formats
    from PIL import Image
    fmt = comfy.latent_formats.Flux()
    factors = torch.tensor(fmt.latent_rgb_factors, dtype=torch.float32, device=x0_raw.device)
    bias = torch.tensor(fmt.latent_rgb_factors_bias or [0.0, 0.0, 0.0], dtype=torch.float32, device=x0_raw.device)
    rgb = torch.einsum("chw,cr->hwr", x0_raw[0].float(), factors) + bias
    img = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    pil = Image.fromarray(img)
    pil.thumbnail((max_size, max_size))
    return ("JPEG", pil, max_size)


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


def free_memory(bytes_needed: int, device: torch.device) -> None:
    import comfy.model_management as mm
    mm.free_memory(bytes_needed, device)


def soft_empty_cache() -> None:
    import comfy.model_management as mm
    mm.soft_empty_cache()
