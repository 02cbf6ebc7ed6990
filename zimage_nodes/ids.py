"""Node ids, display names and socket type names of the pack.

These strings are PERMANENT: every saved workflow stores them (node ids as ``type``/``class_type``,
socket types on every link). Never rename one; add new ones instead.
"""
from __future__ import annotations

CATEGORY_ROOT = "Z-Image"
CAT_LOADERS = f"{CATEGORY_ROOT}/loaders"
CAT_CONDITIONING = f"{CATEGORY_ROOT}/conditioning"
CAT_SAMPLING = f"{CATEGORY_ROOT}/sampling"
CAT_MEMORY = f"{CATEGORY_ROOT}/memory"
CAT_IMAGE = f"{CATEGORY_ROOT}/image"

# Node ids (class_type in API prompts, type in UI workflows).
LOADER = "ZImageLoader"
TEXT_ENCODE = "ZImageTextEncode"
SAMPLER = "ZImageSampler"
MEMORY_POLICY = "ZImageMemoryPolicy"
TILED_UPSCALE = "ZImageTiledUpscale"
VRAM_MONITOR = "ZImageVRAMMonitor"

# Socket types of the pack's own data (core types IMAGE, LATENT, UPSCALE_MODEL are reused as they are).
T_MODEL = "ZIMAGE_MODEL"
T_CONDITIONING = "ZIMAGE_CONDITIONING"
T_POLICY = "ZIMAGE_POLICY"
