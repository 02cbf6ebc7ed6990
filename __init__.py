"""ComfyUI entry point of the Z-Image-Turbo node pack.

ComfyUI imports this file as a package; outside ComfyUI (tests, tools) the import is guarded and
exposes empty mappings. Nothing is loaded, started or printed at import time.
"""
try:
    from .zimage_nodes.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as _e:  # imported outside a package (e.g. by a test collector)
    if __package__:
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
