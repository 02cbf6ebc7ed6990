"""The shipped workflows: every API workflow runs end to end through the real HTTP server on generated
weights and writes PNGs with the workflow embedded; every UI workflow describes the same graph as its
API twin; the README's node reference is generated from the node classes."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from PIL import Image

from tests.comfy_env import REPO

API = sorted((REPO / "workflows" / "api").glob("*.json"))
NAMES = [p.stem for p in API]


def _shrunk(prompt: dict) -> dict:
    """The same graph at CPU-test sizes."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        i = node["inputs"]
        if node["class_type"] == "ZImageSampler":
            i["width"] = i["height"] = 256
        if node["class_type"] == "ZImageTiledUpscale":
            i.update(width=512, height=512, tile_size=256, overlap=64)
    return prompt


def test_every_workflow_has_a_ui_twin_and_the_four_kinds_exist():
    ui = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    assert ui == NAMES
    assert {"z_image_turbo_t2i", "z_image_turbo_t2i_low_vram", "z_image_turbo_t2i_4k_upscale",
            "z_image_turbo_t2i_vram_monitor"} <= set(NAMES)
    for p in API:
        loaders = [n for n in json.loads(p.read_text()).values() if n["class_type"] == "ZImageLoader"]
        assert [(n["inputs"]["dit_name"], n["inputs"]["text_encoder_name"], n["inputs"]["vae_name"])
                for n in loaders] == [("z_image_turbo_bf16.safetensors", "qwen_3_4b.safetensors", "ae.safetensors")]


def _ui_to_api(ui: dict, info: dict) -> dict:
    """What the frontend would queue for a UI workflow (widget values by name, links as [id, slot])."""
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        spec = info[node["type"]]["input"]
        widgets = [(name, s[1] if len(s) > 1 else {}) for section in ("required", "optional")
                   for name, s in spec.get(section, {}).items()
                   if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        values = list(node["widgets_values"])
        inputs = {}
        for name, opts in widgets:
            inputs[name] = values.pop(0)
            if opts.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "randomize", "increment", "decrement")
        for inp in node["inputs"]:
            if inp.get("link") is not None:
                _lid, src, slot, _dst, _tslot, _t = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_and_api_twin_describe_the_same_graph(comfy_server, name):
    info = comfy_server.get("/object_info")
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    from_ui = _ui_to_api(ui, info)
    assert set(from_ui) == set(api)
    for nid, node in api.items():
        want = {k: v for k, v in node["inputs"].items()}
        got = {k: v for k, v in from_ui[nid]["inputs"].items() if k in want or not isinstance(v, list)}
        # optional widgets the API file leaves out take their defaults in the UI file
        extra = {k: v for k, v in got.items() if k not in want}
        assert from_ui[nid]["class_type"] == node["class_type"]
        assert {k: got[k] for k in want} == want, (name, nid)
        spec = {**info[node["class_type"]]["input"].get("required", {}),
                **info[node["class_type"]]["input"].get("optional", {})}
        for k, v in extra.items():
            assert v == spec[k][1].get("default", spec[k][0][0] if isinstance(spec[k][0], list) else None), (name, k)


@pytest.mark.server
@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_through_the_server_and_embeds_itself_in_the_png(comfy_server, name):
    api = _shrunk(json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text()))
    ui = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    entry, messages = comfy_server.run(api, extra_pnginfo={"workflow": ui}, timeout=900)
    assert entry["status"]["status_str"] == "success", [m for m in messages if m["type"] == "execution_error"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert images
    for img in images:
        png = Image.open(comfy_server.base_dir / "output" / img["subfolder"] / img["filename"])
        assert json.loads(png.info["workflow"]) == ui
        assert json.loads(png.info["prompt"]).keys() == api.keys()


def test_readme_node_reference_is_current():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "node_docs.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
