"""Write the UI-format workflows (what users drag into ComfyUI) from their API-format twins.

    .venv/bin/python scripts/make_ui_workflows.py

Each workflows/api/NAME.json becomes workflows/NAME.json: one LiteGraph node per API node, links for
every connection, widget values in the order ComfyUI's frontend reads them (the widget inputs of
INPUT_TYPES, required then optional, with the seed's control_after_generate value after the seed).
A test checks that each UI workflow and its API twin describe the same graph.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def widget_inputs(spec: dict) -> list[tuple[str, dict]]:
    """(name, options) of the inputs the frontend shows as widgets, in its order."""
    out = []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            kind = s[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                out.append((name, s[1] if len(s) > 1 else {}))
    return out


def to_ui(api: dict, object_info: dict) -> dict:
    nodes, links = [], []
    order = sorted(api, key=int)
    link_id = 0
    incoming: dict[str, list] = {}
    for nid in order:
        node = api[nid]
        spec = object_info[node["class_type"]]
        all_inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                src, slot = value
                link_id += 1
                src_type = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), name, src_type])
                incoming.setdefault(nid, []).append((name, link_id, all_inputs[name][0]))
    by_target = {}
    for nid in order:
        node = api[nid]
        info = object_info[node["class_type"]]
        socket_inputs = []
        for name, s in {**info["input"].get("required", {}), **info["input"].get("optional", {})}.items():
            kind = s[0]
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                continue
            link = next((lid for (n, lid, _t) in incoming.get(nid, []) if n == name), None)
            socket_inputs.append({"name": name, "type": kind, "link": link})
        widgets = []
        for name, opts in widget_inputs(info["input"]):
            widgets.append(node["inputs"].get(name, opts.get("default")))
            if opts.get("control_after_generate"):
                widgets.append("fixed")
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))]
        ui = {"id": int(nid), "type": node["class_type"], "pos": [0, 0], "size": [320, 200], "flags": {},
              "order": order.index(nid), "mode": 0, "inputs": socket_inputs, "outputs": outputs,
              "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets}
        if "_meta" in node:
            ui["title"] = node["_meta"].get("title", node["class_type"])
        by_target[nid] = ui
        nodes.append(ui)
    # resolve link target slots (index among socket inputs) and source output link lists
    for link in links:
        lid, src, slot, dst, name, _t = link
        target = by_target[str(dst)]
        link[4] = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == name)
        by_target[str(src)]["outputs"][slot]["links"].append(lid)
    _layout(nodes, links)
    return {"last_node_id": max(int(n) for n in order), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [30, 160]}}, "version": 0.4}


def _layout(nodes: list[dict], links: list[list]) -> None:
    """Columns by graph depth, so the graph reads left to right."""
    depth = {n["id"]: 0 for n in nodes}
    for _ in nodes:
        for _lid, src, _s, dst, _slot, _t in links:
            depth[dst] = max(depth[dst], depth[src] + 1)
    rows: dict[int, int] = {}
    for n in nodes:
        d = depth[n["id"]]
        n["pos"] = [40 + 380 * d, 60 + 320 * rows.get(d, 0)]
        rows[d] = rows.get(d, 0) + 1


def object_info() -> dict:
    """/object_info from the real ComfyUI server (with this pack loaded)."""
    from zimage_nodes.testing.comfy import ComfyServer
    server = ComfyServer(Path(tempfile.mkdtemp(prefix="zimage_ui_")))
    try:
        return server.get("/object_info")
    finally:
        server.stop()


def main() -> int:
    info = object_info()
    for api_path in sorted((REPO / "workflows" / "api").glob("*.json")):
        ui = to_ui(json.loads(api_path.read_text()), info)
        (REPO / "workflows" / api_path.name).write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote workflows/{api_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
