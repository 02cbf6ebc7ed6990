"""The VRAM monitor inside the real ComfyUI: in-process executor and HTTP server."""
from __future__ import annotations

import copy
import json
import re
import threading
import uuid

import pytest
import torch

from tests.comfy_env import PACK_DIR_NAME, REPO
from zimage_nodes.core import vram

MONITOR = "ZImageVRAMMonitor"


def _t2i(size: int = 256, steps: int = 3) -> dict:
    prompt = json.loads((REPO / "workflows/api/z_image_turbo_t2i.json").read_text())
    prompt["3"]["inputs"].update(width=size, height=size, steps=steps)
    return prompt


def _monitor(value=None, width: int = 1024, height: int = 512) -> dict:
    inputs = {"plot_width": width, "plot_height": height}
    if value is not None:
        inputs["value"] = value
    return {"class_type": MONITOR, "inputs": inputs}


def monitored_t2i() -> dict:
    """Monitors on a ZIMAGE_MODEL (10), a LATENT (11) and an IMAGE (12), each feeding a typed input."""
    p = _t2i()
    p["10"] = _monitor(["1", 0])
    p["2"]["inputs"]["model"] = ["10", 0]
    p["3"]["inputs"]["model"] = ["10", 0]
    p["11"] = _monitor(["3", 0], 640, 320)
    p["5"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "zimage_monitor"}}
    p["12"] = _monitor(["3", 1])
    p["4"]["inputs"]["images"] = ["12", 0]
    return p


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == vram.THREAD_NAME]


def outputs_of(comfy, node_id: str) -> list:
    entry = comfy.executor.caches.outputs.get(node_id)
    assert entry is not None, f"node {node_id} has no cached output"
    return entry.outputs


def span_colours(plot: torch.Tensor) -> set[tuple[int, int, int]]:
    """Palette colours found on the node span strip under the plot."""
    h, w = plot.shape[1], plot.shape[2]
    _box, (x0, y0, x1, y1) = vram.plot_geometry(w, h)
    row = (plot[0, (y0 + y1) // 2, x0:x1] * 255).round().to(torch.int64).tolist()
    return {tuple(px) for px in row} & set(vram.SPAN_COLORS)


def test_any_type_passes_comfyui_link_validation(comfy):
    from comfy_execution.validation import validate_node_input
    from zimage_nodes.nodes.monitor import ANY
    for t in ("IMAGE", "LATENT", "ZIMAGE_MODEL", "STRING,INT"):
        assert validate_node_input(t, ANY) and validate_node_input(ANY, t)


def test_monitor_passes_values_through_and_reports_every_node_before_it(comfy, tmp_path):
    before = threading.active_count()
    p = monitored_t2i()
    p["1"]["inputs"]["embedding_cache_dir"] = str(tmp_path)   # a loader input no other test uses: all run
    r = comfy.run(p)
    assert r.success, r.error
    assert not sampler_threads() and threading.active_count() <= before

    # pass-through: the very objects, for ZIMAGE_MODEL, LATENT and IMAGE
    assert outputs_of(comfy, "10")[0][0] is outputs_of(comfy, "1")[0][0]
    assert outputs_of(comfy, "11")[0][0] is outputs_of(comfy, "3")[0][0]
    assert outputs_of(comfy, "12")[0][0] is outputs_of(comfy, "3")[1][0]

    # the report: in the node's UI and on the STRING output
    text = r.outputs["12"]["text"][0]
    assert outputs_of(comfy, "12")[1][0] == text
    for node_id, cls in (("1", "ZImageLoader"), ("10", MONITOR), ("2", "ZImageTextEncode"),
                         ("3", "ZImageSampler")):
        assert re.search(rf"#{node_id}\s+{cls}\s+\d+\.\d{{3}} s\s+peak", text), (node_id, text)
    assert "#12 " not in text and "connect it to the final output" in text
    if not torch.cuda.is_available():
        assert "no CUDA device: host memory only" in text
    early = r.outputs["10"]["text"][0]   # the first monitor saw only the loader
    assert "ZImageLoader" in early and "ZImageSampler" not in early

    # the plots: requested sizes, drawn, with one span colour per node that ran before the monitor
    plot = outputs_of(comfy, "12")[2][0]
    assert plot.shape == (1, 512, 1024, 3) and plot.dtype == torch.float32
    assert float(plot.min()) >= 0.0 and float(plot.max()) <= 1.0 and float(plot.std()) > 0.05
    assert len(span_colours(plot)) >= 3
    assert outputs_of(comfy, "11")[2][0].shape == (1, 320, 640, 3)

    # a second run: the loader's output is reused, the sampler runs again, a new prompt is reported
    p["3"]["inputs"]["seed"] = 1234
    r2 = comfy.run(p)
    assert r2.success, r2.error
    text2 = r2.outputs["12"]["text"][0]
    assert text2.splitlines()[0] != text.splitlines()[0]   # another prompt id
    assert re.search(r"#3\s+ZImageSampler\s+\d+\.\d{3} s", text2)
    assert not re.search(r"ZImageLoader\s+\d", text2)   # reused: not run again
    assert not sampler_threads()


def test_sampling_stops_when_the_prompt_fails_before_the_monitor(comfy):
    p = _t2i()
    p["3"]["inputs"]["width"] = 128          # the sampler refuses it at run time
    p["12"] = _monitor(["3", 1])
    p["4"]["inputs"]["images"] = ["12", 0]
    r = comfy.run(p)
    assert not r.success and "width" in r.error["exception_message"]
    assert not sampler_threads()


def test_monitor_alone_reports_memory_now(comfy):
    r = comfy.run({"7": _monitor(width=320, height=200)})
    assert r.success, r.error
    text = r.outputs["7"]["text"][0]
    assert "No node finished before this monitor" in text and "Now: " in text
    assert outputs_of(comfy, "7")[2][0].shape == (1, 200, 320, 3)
    assert outputs_of(comfy, "7")[0][0] is None
    assert not sampler_threads()


def test_without_a_cache_comfyui_skips_is_changed_and_the_monitor_says_so(comfy):
    """--cache-none: ComfyUI never calls IS_CHANGED, so the monitor hooks itself in when it runs."""
    execution = comfy.execution
    executor = execution.PromptExecutor(comfy.server, cache_type=execution.CacheType.NONE,
                                        cache_args={"lru": 0, "ram": 0.0})
    prompt = {"7": _monitor(width=320, height=200)}
    valid, err, outputs, _ = comfy.validate(prompt)
    assert valid, err
    executor.execute(copy.deepcopy(prompt), str(uuid.uuid4()), {"client_id": "test"}, outputs)
    assert executor.success
    text = executor.history_result["outputs"]["7"]["text"][0]
    assert "were not recorded" in text and "--cache-none" in text
    assert not sampler_threads()


@pytest.mark.server
def test_monitor_over_http_and_the_vram_route(comfy_server):
    import requests
    info = comfy_server.get("/object_info")[MONITOR]
    assert info["category"] == "Z-Image/memory" and info["display_name"] == "Z-Image VRAM Monitor"
    assert info["description"] and "last" in info["description"]
    assert info["output"] == ["*", "STRING", "IMAGE"] and all(info["output_tooltips"])
    assert info["input"]["optional"]["value"][0] == "*"
    assert info["input"]["optional"]["policy"][0] == "ZIMAGE_POLICY"
    for section in ("required", "optional"):
        for name, spec in info["input"][section].items():
            assert spec[1].get("tooltip"), name

    idle = comfy_server.get("/zimage/vram")
    assert idle["snapshot"]["host_rss"] > 0 and "device" in idle

    p = _t2i()
    p["3"]["inputs"]["seed"] = uuid.uuid4().int % 2 ** 32   # the sampler runs whatever ran before
    p["12"] = _monitor(["3", 1])
    p["4"]["inputs"]["images"] = ["12", 0]
    entry, messages = comfy_server.run(p)
    assert entry["status"]["status_str"] == "success", messages
    text = entry["outputs"]["12"]["text"][0]
    assert re.search(r"#3\s+ZImageSampler\s+\d+\.\d{3} s", text), text

    live = comfy_server.get("/zimage/vram")
    assert live["prompt"] is not None and live["prompt"]["sampling"] is False
    nodes = {n["node_id"]: n for n in live["prompt"]["nodes"]}
    assert nodes["3"]["label"] == "ZImageSampler" and nodes["3"]["duration"] > 0
    assert live["prompt"]["samples"] and "host_rss" in live["prompt"]["samples"][0]
    last_t = live["prompt"]["samples"][-1]["t"]
    assert comfy_server.get(f"/api/zimage/vram?since={last_t}")["prompt"]["samples"] == []

    js = requests.get(f"{comfy_server.url}/extensions/{PACK_DIR_NAME}/zimage_vram.js", timeout=30)
    assert js.status_code == 200 and MONITOR in js.text
