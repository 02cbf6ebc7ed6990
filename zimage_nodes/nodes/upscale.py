"""ZImageTiledUpscale: a thin node class around upscaler.upscale."""
from __future__ import annotations

from .. import ids, upscaler
from ..upscaler import BlendMode


class ZImageTiledUpscale:
    DESCRIPTION = (
        "Upscales an image (Lanczos, or a core upscale model such as ESRGAN) and refines it with Z-Image tile by "
        "tile (img2img at `denoise`), up to 8192 px a side. Only one tile is on the GPU at a time, so VRAM does "
        "not grow with the output size; on out-of-memory the tile is halved (down to 256 px) and the image "
        "restarted. Blending: feather/cosine blend the decoded tiles; latent averages the overlapping tiles' "
        "latents at every step (MultiDiffusion), for higher denoise where tiles would disagree. "
        "Batches: every image of an IMAGE batch is upscaled in turn (image i uses seed + i) and the node "
        "returns a batch of the same length.")
    CATEGORY = ids.CAT_IMAGE
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    OUTPUT_TOOLTIPS = ("The upscaled images (same batch length as the input).",
                       "Sizes, tile layout, blending and any adjustment made (e.g. a halved tile).")
    FUNCTION = "upscale"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (ids.T_MODEL, {"tooltip": "From Z-Image Loader (staged)."}),
                "image": ("IMAGE", {"tooltip": "The image(s) to upscale, e.g. from Load Image or Z-Image Sampler."}),
                "positive": (ids.T_CONDITIONING, {
                    "tooltip": "From Z-Image Text Encode: the prompt of the image, or one describing the detail "
                               "wanted. Every tile uses it."}),
                "scale_by": ("FLOAT", {"default": 2.0, "min": 0.01, "max": 16.0, "step": 0.05,
                                       "tooltip": "Upscale factor, used when width and height are 0."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 16,
                                  "tooltip": "Output width in pixels (at most 8192); 0 = use scale_by. With only "
                                             "one of width/height set, the other keeps the aspect ratio."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 16384, "step": 16,
                                   "tooltip": "Output height in pixels (at most 8192); 0 = use scale_by."}),
                "tile_size": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                      "tooltip": "Largest tile side in pixels (>= 256, >= 2 x overlap). Tiles are "
                                                 "made equal and as small as the overlap allows. Larger tiles see "
                                                 "more context; smaller ones need less VRAM."}),
                "overlap": ("INT", {"default": 128, "min": 0, "max": 4096, "step": 16,
                                    "tooltip": "Least overlap between neighbouring tiles in pixels, a multiple of "
                                               "16. Seams are blended across it."}),
                "denoise": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "How much each tile is re-generated: 0 = plain upscale (through "
                                                 "the VAE), 0.2-0.4 = added detail, higher = the prompt takes over "
                                                 "(use latent blending there)."}),
                "steps": ("INT", {"default": 9, "min": 1, "max": 100,
                                  "tooltip": "Turbo schedule steps as in Z-Image Sampler (9 = 8 DiT forwards per "
                                             "tile at any denoise, like core KSampler's denoise). Fewer is faster."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed (drawn as core's samplers draw it; image i of a batch uses "
                                            "seed + i). The same seed gives the same result."}),
                "blend": ([m.value for m in BlendMode], {
                    "default": BlendMode.FEATHER.value,
                    "tooltip": "feather: decoded tiles blended with linear ramps across the overlap (default). "
                               "cosine: smoother ramp ends, steeper middle. latent: the overlapping tiles' latents "
                               "are averaged at every step (MultiDiffusion); pays off at denoise >= 0.4 where tiles "
                               "would otherwise disagree on the overlap."}),
            },
            "optional": {
                "upscale_model": ("UPSCALE_MODEL", {
                    "tooltip": "Optional model from Load Upscale Model (e.g. 4x ESRGAN) for the pixel upscale, run "
                               "as core's Upscale Image (using Model) runs it; its output is then resized to the "
                               "target size with Lanczos. Without it, Lanczos alone."}),
                "policy": (ids.T_POLICY, {"tooltip": "Optional memory policy; its max_batch sets how many tiles go "
                                                     "through the DiT together (default 1)."}),
            },
        }

    def upscale(self, model, image, positive, scale_by, width, height, tile_size, overlap, denoise, steps, seed,
                blend, upscale_model=None, policy=None):
        images, report = upscaler.upscale(model, image, positive, scale_by, width, height, tile_size, overlap,
                                          denoise, steps, seed, blend, upscale_model, policy)
        return {"ui": {"text": [report]}, "result": (images, report)}
