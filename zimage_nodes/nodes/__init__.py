"""The pack's node classes, registered with ComfyUI through NODE_CLASS_MAPPINGS (V1 node API,
supported by ComfyUI 0.3.x and later)."""
from __future__ import annotations

from .. import ids
from .loader import ZImageLoader, ZImageTextEncode
from .sampler import ZImageSampler

NODE_CLASS_MAPPINGS = {
    ids.LOADER: ZImageLoader,
    ids.TEXT_ENCODE: ZImageTextEncode,
    ids.SAMPLER: ZImageSampler,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    ids.LOADER: "Z-Image Loader (staged)",
    ids.TEXT_ENCODE: "Z-Image Text Encode",
    ids.SAMPLER: "Z-Image Sampler (Turbo)",
}
