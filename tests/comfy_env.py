"""The real-ComfyUI drivers used by the tests (they live in zimage_nodes.testing.comfy so the run
command and the benchmarks share them)."""
from zimage_nodes.testing.comfy import *  # noqa: F401,F403
from zimage_nodes.testing.comfy import (InProcessComfy, ComfyServer, RunResult, comfy_root,  # noqa: F401
                                        ensure_comfy_importable, link_pack, REPO, PACK_DIR_NAME)
