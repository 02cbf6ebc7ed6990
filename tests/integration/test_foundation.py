"""The pack inside a real ComfyUI: entry point, registration, and a shipped workflow end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.comfy_env import REPO

OUR_NODES = {
    "ZImageLoader": "Z-Image/loaders",
    "ZImageTextEncode": "Z-Image/conditioning",
    "ZImageSampler": "Z-Image/sampling",
}


def test_entry_point_imports_without_comfyui_and_does_no_work():
    """The pack's __init__.py imports as a package with no ComfyUI on the path, starts no thread,
    imports no ComfyUI module and prints nothing."""
    code = f"""
import importlib.util, sys, threading
before = threading.active_count()
spec = importlib.util.spec_from_file_location("zimage_pack", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["zimage_pack"] = mod; spec.loader.exec_module(mod)
comfy = sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "nodes", "server", "execution"))
print(repr((sorted(mod.NODE_CLASS_MAPPINGS), comfy, threading.active_count() - before)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr
    names, comfy_modules, new_threads = eval(out.stdout.strip().splitlines()[-1])
    assert set(OUR_NODES) <= set(names)
    assert comfy_modules == []
    assert new_threads == 0
    assert out.stdout.strip().count("\n") == 0  # nothing printed but our line


@pytest.mark.server
def test_object_info_lists_every_node_with_category_and_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    for node_id, category in OUR_NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["category"] == category
        assert node["display_name"].startswith("Z-Image")
        assert node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert node.get("output_tooltips") and all(node["output_tooltips"])
    loader = info["ZImageLoader"]["input"]["required"]
    assert "z_image_turbo_bf16.safetensors" in loader["dit_name"][0]
    assert "qwen_3_4b.safetensors" in loader["text_encoder_name"][0]
    assert "ae.safetensors" in loader["vae_name"][0]
    assert "Z-Image-Turbo" in loader["diffusers_folder"][0]


def _small(prompt: dict, size: int = 256) -> dict:
    for node in prompt.values():
        if node["class_type"] == "ZImageSampler":
            node["inputs"]["width"] = node["inputs"]["height"] = size
    return prompt


@pytest.mark.server
def test_text_to_image_workflow_runs_through_the_http_server(comfy_server):
    prompt = _small(json.loads((REPO / "workflows/api/z_image_turbo_t2i.json").read_text()))
    # A prefix of its own: ComfyUI's cache does not key on extra_pnginfo, so the same prompt run by another test
    # on this session's server (test_workflows) would otherwise be served this one's PNG with its workflow.
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = "foundation_test"
    entry, messages = comfy_server.run(prompt, extra_pnginfo={"workflow": {"note": "test"}})
    assert entry["status"]["status_str"] == "success", messages
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1
    path = comfy_server.base_dir / "output" / images[0]["subfolder"] / images[0]["filename"]
    png = Image.open(path)
    assert png.size == (256, 256)
    assert json.loads(png.info["prompt"])["3"]["class_type"] == "ZImageSampler"
    assert json.loads(png.info["workflow"]) == {"note": "test"}
    progress = [m for m in messages if m["type"] == "progress" and m["data"]["node"] == "3"]
    assert [p["data"]["value"] for p in progress][-1] == 8  # one update per DiT forward
