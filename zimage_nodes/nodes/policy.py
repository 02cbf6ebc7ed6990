"""ZImageMemoryPolicy: a thin node class around policy_runtime.make_policy."""
from __future__ import annotations

from .. import ids, policy_runtime
from ..core.attention import BACKENDS
from ..core.policy import DiTWeights, Mode, VAEMode


class ZImageMemoryPolicy:
    DESCRIPTION = ("Chooses how Z-Image uses VRAM. auto picks the fastest mode whose predicted peak fits the "
                   "budget: full_gpu, model_offload (components take turns), block_swap (DiT and text-encoder "
                   "blocks stream from pinned host memory, overlapped with compute), sequential (smallest "
                   "footprint) or cpu. Connect it to the loader and the sampler. On CUDA out-of-memory the "
                   "sampler steps down one mode and retries once (oom_fallback).")
    CATEGORY = ids.CAT_MEMORY
    RETURN_TYPES = (ids.T_POLICY, "STRING")
    RETURN_NAMES = ("policy", "report")
    OUTPUT_TOOLTIPS = ("The memory policy (connect to Z-Image Loader and Z-Image Sampler).",
                       "The settings in force, with any adjustment (clamped budget, missing backend).")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mode": ([m.value for m in Mode], {"default": Mode.AUTO.value,
                     "tooltip": "auto = fastest mode that fits the budget. full_gpu > model_offload > block_swap > "
                                "sequential > cpu, from fastest to smallest."}),
            "vram_budget_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                               "tooltip": "VRAM Z-Image may use, in GB. 0 = what ComfyUI says is free minus its "
                                          "reserve (--reserve-vram). Larger than the card: clamped, with a note."}),
            "dit_weights": ([w.value for w in DiTWeights], {"default": DiTWeights.BF16.value,
                            "tooltip": "DiT weight storage: bf16; fp8 (half the memory and streaming, bf16 "
                                       "matmuls); fp8_fast (fp8 matmuls on GPUs that have them, else fp8)."}),
            "attention": (["auto", *BACKENDS], {"default": "auto",
                          "tooltip": "Attention kernel. auto = fa3 on a Hopper GPU when FlashAttention-3 is installed "
                                     "(flash_attn_interface or fa3-fwd; on an H100 2% faster than cuDNN's kernel), else "
                                     "PyTorch SDPA (on Hopper it runs cuDNN's kernel, measured faster than its flash and "
                                     "efficient kernels); a missing backend falls back to sdpa with a note."}),
            "vae_mode": ([v.value for v in VAEMode], {"default": VAEMode.AUTO.value,
                         "tooltip": "auto = untiled when it fits beside the DiT, else tiled."}),
            "vae_tile": ("INT", {"default": 512, "min": 256, "max": 2048, "step": 64,
                                 "tooltip": "Tile size in pixels for tiled VAE decode/encode."}),
            "resident_blocks": ("INT", {"default": -1, "min": -1, "max": 64,
                                "tooltip": "block_swap: DiT blocks kept on the GPU (-1 = as many as the budget "
                                           "allows)."}),
            "prefetch": ("INT", {"default": 2, "min": 1, "max": 8,
                                 "tooltip": "block_swap: blocks copied ahead of the one computing."}),
            "cache_clear_interval": ("INT", {"default": 0, "min": 0, "max": 100,
                                     "tooltip": "Empty the CUDA cache every N DiT forwards (0 = never)."}),
            "oom_fallback": ("BOOLEAN", {"default": True,
                             "tooltip": "On CUDA out-of-memory, release memory, step down one mode and retry once."}),
        }}

    def make(self, mode, vram_budget_gb, dit_weights, attention, vae_mode, vae_tile, resident_blocks, prefetch,
             cache_clear_interval, oom_fallback):
        policy, report = policy_runtime.make_policy(mode, vram_budget_gb, dit_weights, attention, vae_mode, vae_tile,
                                                    resident_blocks, prefetch, cache_clear_interval, oom_fallback)
        return {"ui": {"text": [report]}, "result": (policy, report)}
