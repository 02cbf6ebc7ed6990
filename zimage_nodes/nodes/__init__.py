"""The pack's node classes, registered with ComfyUI through NODE_CLASS_MAPPINGS (V1 node API,
supported by ComfyUI 0.3.x and later)."""
from __future__ import annotations

from .. import ids
from .loader import ZImageLoader, ZImageTextEncode
from .sampler import ZImageSampler
from .monitor import ZImageVRAMMonitor
from .policy import ZImageMemoryPolicy
from .upscale import ZImageTiledUpscale

NODE_CLASS_MAPPINGS = {
    ids.LOADER: ZImageLoader,
    ids.TEXT_ENCODE: ZImageTextEncode,
    ids.SAMPLER: ZImageSampler,
    ids.VRAM_MONITOR: ZImageVRAMMonitor,
    ids.MEMORY_POLICY: ZImageMemoryPolicy,
    ids.TILED_UPSCALE: ZImageTiledUpscale,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    ids.LOADER: "Z-Image Loader (staged)",
    ids.TEXT_ENCODE: "Z-Image Text Encode",
    ids.SAMPLER: "Z-Image Sampler (Turbo)",
    ids.VRAM_MONITOR: "Z-Image VRAM Monitor",
    ids.MEMORY_POLICY: "Z-Image Memory Policy",
    ids.TILED_UPSCALE: "Z-Image Tiled Upscale",
}

# GET /zimage/vram for the VRAM monitor's widget: added to ComfyUI's server when one is running (this
# module is imported by ComfyUI when it loads the pack); outside a server it does nothing.
from .. import monitor as _monitor  # noqa: E402

_monitor.register_routes()
