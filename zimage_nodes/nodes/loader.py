"""ZImageLoader and ZImageTextEncode: thin node classes around runtime.load_model / encode_text."""
from __future__ import annotations

from .. import comfy_bridge as bridge
from .. import ids, runtime
from ..core.loader import DTYPES

DTYPE_CHOICES = list(DTYPES)


class ZImageLoader:
    DESCRIPTION = ("Loads Z-Image-Turbo's DiT, Qwen3 text encoder and Flux VAE in stages: identifies every file "
                   "first, builds on the meta device, streams tensors straight to their device, and hands each "
                   "component to ComfyUI's model management. The text encoder loads on first use.")
    CATEGORY = ids.CAT_LOADERS
    RETURN_TYPES = (ids.T_MODEL, "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The loaded Z-Image model (feed it to Z-Image Text Encode and Z-Image Sampler).",
                       "What was loaded where, in which dtype, and any fallback taken.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        def device(tip):
            return (bridge.device_choices(), {"default": "auto", "tooltip": tip})

        def dtype(tip):
            return (DTYPE_CHOICES, {"default": "auto", "tooltip": tip})

        return {
            "required": {
                "dit_name": (bridge.list_files(bridge.DIT_FOLDER), {
                    "tooltip": "The Z-Image DiT from models/diffusion_models, e.g. z_image_turbo_bf16.safetensors "
                               "(bf16 or fp8 repacks, with or without the model.diffusion_model. prefix)."}),
                "text_encoder_name": (bridge.list_files(bridge.TE_FOLDER), {
                    "tooltip": "The Qwen3-4B text encoder from models/text_encoders, e.g. qwen_3_4b.safetensors."}),
                "vae_name": (bridge.list_files(bridge.VAE_FOLDER), {
                    "tooltip": "The Flux VAE from models/vae, e.g. ae.safetensors."}),
                "diffusers_folder": ([bridge.NONE] + bridge.list_diffusers_folders(), {
                    "default": bridge.NONE,
                    "tooltip": "A diffusers folder (models/diffusers/Z-Image-Turbo). When set, it is used instead "
                               "of the three single files above."}),
                "dit_device": device("Where the DiT runs. auto = ComfyUI's GPU."),
                "dit_dtype": dtype("DiT weight storage. auto = bf16 on GPU (fp32 on CPU); fp8 stores 8-bit "
                                   "weights and computes in bf16."),
                "te_device": device("Where the text encoder runs. auto = ComfyUI's text encoder device."),
                "te_dtype": dtype("Text encoder weight storage."),
                "vae_device": device("Where the VAE runs. auto = ComfyUI's VAE device."),
                "vae_dtype": dtype("VAE dtype. fp16 is never used (it gives NaN with this VAE): bf16 instead."),
            },
            "optional": {
                "embedding_cache_dir": ("STRING", {
                    "default": "", "tooltip": "Optional folder to keep prompt embeddings on disk between "
                                              "ComfyUI restarts (safetensors files). Empty = memory only."}),
                "policy": (ids.T_POLICY, {
                    "tooltip": "From Z-Image Memory Policy. Decides where the DiT is loaded (its GPU, or host "
                               "memory when its blocks will stream) and its weight storage. Not connected: "
                               "auto, shaped by ComfyUI's --lowvram/--novram/--highvram/--gpu-only flags."}),
            },
        }

    def load(self, dit_name, text_encoder_name, vae_name, diffusers_folder, dit_device, dit_dtype,
             te_device, te_dtype, vae_device, vae_dtype, embedding_cache_dir="", policy=None):
        model, report = runtime.load_model(dit_name, text_encoder_name, vae_name, diffusers_folder, dit_device,
                                           dit_dtype, te_device, te_dtype, vae_device, vae_dtype,
                                           embedding_cache_dir, policy)
        return {"ui": {"text": [report]}, "result": (model, report)}


class ZImageTextEncode:
    DESCRIPTION = ("Encodes a prompt with Z-Image's Qwen3 text encoder (hidden_states[-2], Z-Image's chat "
                   "template). Embeddings are cached per prompt and text encoder, so changing only the seed never "
                   "touches the text encoder.")
    CATEGORY = ids.CAT_CONDITIONING
    RETURN_TYPES = (ids.T_CONDITIONING, "STRING")
    RETURN_NAMES = ("conditioning", "report")
    OUTPUT_TOOLTIPS = ("The prompt embedding for Z-Image Sampler.", "Token count and cache status.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (ids.T_MODEL, {"tooltip": "From Z-Image Loader (staged)."}),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                "tooltip": "The prompt. At most 512 tokens; longer prompts are truncated with a note."}),
        }}

    def encode(self, model, text):
        cond, report = runtime.encode_text(model, text)
        return {"ui": {"text": [report]}, "result": (cond, report)}
