"""Shared fixtures: generated checkpoints in the real layouts, and the real ComfyUI (in-process and server)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import comfy_env

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def pytest_collection_modifyitems(config, items):
    # soak-marked tests run only when asked for: `-m soak` (any -m naming soak) or ZIMAGE_SOAK=1
    if "soak" not in (config.getoption("-m") or "").replace("not soak", "") and os.environ.get("ZIMAGE_SOAK") != "1":
        skip_soak = pytest.mark.skip(reason="long soak: run with -m soak or ZIMAGE_SOAK=1")
        for item in items:
            if "soak" in item.keywords:
                item.add_marker(skip_soak)
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine, see README 'Benchmarks')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """The base directory every in-process ComfyUI import of this test process uses, with the
    tiny generated checkpoints in its models/ folder under the file names users have."""
    from zimage_nodes.testing import weights
    base = tmp_path_factory.mktemp("comfy_base")
    weights.write_all(base / "models", scale="tiny", tokenizer_src=comfy_env.comfy_root()
                      / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return base


@pytest.fixture(scope="session")
def tiny_models(comfy_base) -> Path:
    return comfy_base / "models"


@pytest.fixture(scope="session")
def comfy_modules(comfy_base):
    """ComfyUI importable in this process (arguments parsed, --cpu without a GPU); no nodes loaded."""
    comfy_env.ensure_comfy_importable(comfy_base)
    return comfy_env.comfy_root()


@pytest.fixture(scope="session")
def comfy(comfy_base) -> comfy_env.InProcessComfy:
    """The real ComfyUI executor in-process with core nodes and this pack."""
    return comfy_env.InProcessComfy.get(comfy_base)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, tiny_models):
    server = comfy_env.ComfyServer(tmp_path_factory.mktemp("server_base"), models_dir=tiny_models)
    yield server
    server.stop()
