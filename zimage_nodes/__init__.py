"""Z-Image-Turbo nodes for ComfyUI.

Importing this package does no work and imports nothing from ComfyUI: the ComfyUI-facing
classes live in ``zimage_nodes.nodes`` and are imported by the pack's top-level ``__init__.py``
when ComfyUI loads it. The torch logic lives in ``zimage_nodes.core`` and runs without ComfyUI.
"""
__version__ = "0.1.0"
