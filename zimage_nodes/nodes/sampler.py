"""ZImageSampler: a thin node class around runtime.sample."""
from __future__ import annotations

from .. import ids, runtime
from ..core.schedule import Schedule


class ZImageSampler:
    DESCRIPTION = ("Samples Z-Image-Turbo with the official Turbo schedule (9 steps = 8 DiT forwards, shift 3) or "
                   "ComfyUI's template schedule, then decodes. Outputs a core LATENT (decodable by core VAE "
                   "Decode with ae.safetensors) and an IMAGE. Seeds draw noise exactly as core KSampler does. "
                   "Progress and Cancel work per DiT step; live previews follow ComfyUI's preview method.")
    CATEGORY = ids.CAT_SAMPLING
    RETURN_TYPES = ("LATENT", "IMAGE", "STRING")
    RETURN_NAMES = ("latent", "image", "report")
    OUTPUT_TOOLTIPS = ("The result in core LATENT format (raw Flux VAE latent space).",
                       "The decoded images.", "Schedule used and any input that was adjusted.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (ids.T_MODEL, {"tooltip": "From Z-Image Loader (staged)."}),
                "positive": (ids.T_CONDITIONING, {"tooltip": "From Z-Image Text Encode."}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                                  "tooltip": "256..2048, multiple of 16 (other values are snapped down with a note)."}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 16384, "step": 16,
                                   "tooltip": "256..2048, multiple of 16 (other values are snapped down with a note)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed; the same seed gives the same noise as core KSampler."}),
                "steps": ("INT", {"default": 9, "min": 0, "max": 100,
                                  "tooltip": "turbo: sigmas counted as in ComfyUI (9 = the official 8 DiT forwards); "
                                             "comfy_simple: DiT forwards."}),
                "schedule": ([s.value for s in Schedule], {"default": Schedule.TURBO.value,
                             "tooltip": "turbo = the official Z-Image-Turbo schedule; comfy_simple = ComfyUI's "
                                        "template (ModelSamplingAuraFlow + simple), for parity with the native "
                                        "workflow."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.01, "max": 100.0, "step": 0.01,
                                    "tooltip": "Flow-matching time shift (3 for Z-Image-Turbo)."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "1 = off (Turbo needs none). Above 1 the negative prompt runs (batched "
                                             "with the positive when both prompts have the same token count, else "
                                             "as a second DiT call), for non-Turbo checkpoints."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Images per run (ignored when a latent/image input is given)."}),
                "max_batch": ("INT", {"default": 0, "min": 0, "max": 64,
                                      "tooltip": "Largest batch sent to the DiT at once (0 = all at once)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = text-to-image. Below 1 refines the latent/image input, as core "
                                                 "KSampler's denoise (0 returns the input unchanged)."}),
            },
            "optional": {
                "negative": (ids.T_CONDITIONING, {"tooltip": "Negative prompt, used only when cfg > 1."}),
                "latent": ("LATENT", {"tooltip": "Start from this latent (image-to-image with denoise < 1)."}),
                "image": ("IMAGE", {"tooltip": "Start from this image (encoded with the loader's VAE)."}),
                "compile": (list(runtime.COMPILE_CHOICES), {
                    "default": "auto",
                    "tooltip": "blocks = run the DiT's transformer blocks through torch.compile (needs triton on "
                               "NVIDIA); auto = blocks when the DiT runs resident on an NVIDIA GPU with triton, "
                               "else off. The first run (and a new batch size) compiles for a few seconds; "
                               "other sizes and prompt lengths reuse it. Same image as off up to rounding. "
                               "Falls back to off if compiling fails. With the environment variable "
                               "ZIMAGE_CUDA_GRAPHS=1 (experimental), auto also replays the forwards after the "
                               "first from a CUDA graph recorded for the run when the memory plan has room for it."}),
            },
        }

    def sample(self, model, positive, width, height, seed, steps, schedule, shift, cfg, batch_size, max_batch,
               denoise, negative=None, latent=None, image=None, compile="auto"):
        latent_out, images, report = runtime.sample(model, positive, width, height, seed, steps, schedule, shift,
                                                    cfg, batch_size, max_batch, denoise, negative, latent, image,
                                                    compile_mode=compile)
        return {"ui": {"text": [report]}, "result": (latent_out, images, report)}
