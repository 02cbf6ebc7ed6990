"""Every UI workflow loads in the real ComfyUI frontend (the comfyui-frontend-package that pairs with the
ComfyUI in use), served by the real server, in headless Chromium from the distribution's packages:
no missing node types, no node errors, widget values as saved; a screenshot of each is kept; the
template browser lists the pack's workflows."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.comfy_env import REPO, PACK_DIR_NAME

pytestmark = [pytest.mark.browser, pytest.mark.server]
PLAYWRIGHT = REPO / ".browser" / "node_modules" / "playwright-core"
SHOTS = REPO / ".cache" / "screenshots"


def _missing() -> str | None:
    if not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        return "Chromium is not installed (scripts/setup_browser.sh installs Debian's chromium; it needs root)"
    if shutil.which("node") is None:
        return "Node.js is not installed"
    if not PLAYWRIGHT.is_dir():
        return "playwright-core is not installed (scripts/setup_browser.sh installs it with npm)"
    return None


def test_ui_workflows_load_in_the_real_frontend(comfy_server):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    SHOTS.mkdir(parents=True, exist_ok=True)
    files = sorted(str(p) for p in (REPO / "workflows").glob("*.json"))
    env = dict(os.environ, PLAYWRIGHT_CORE_DIR=str(PLAYWRIGHT))
    out = subprocess.run(["node", str(REPO / "tests" / "browser" / "check_frontend.mjs"), comfy_server.url,
                          str(SHOTS), *files], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["workflows"]) == len(files) >= 4
    for name, report in result["workflows"].items():
        saved = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert report["nodes"] == len(saved["nodes"]), name
        assert report["missing"] == [], f"{name}: missing node types {report['missing']}"
        assert report["errors"] == [], f"{name}: nodes with errors {report['errors']}"
        for node in saved["nodes"]:
            shown = report["widgets"][str(node["id"])]
            assert shown[:len(node["widgets_values"])] == node["widgets_values"], (name, node["type"])
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000
    templates = result["templates"]
    ours = next((v for k, v in templates.items() if PACK_DIR_NAME in k), None)
    assert ours is not None, f"the template browser does not list the pack: {list(templates)}"
    assert {f"{Path(f).stem}" for f in files} <= set(ours)
