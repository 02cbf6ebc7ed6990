"""Locating and driving the real ComfyUI that scripts/setup.sh provisioned (tests, benchmarks, the run command).

Two tiers, both against the real thing:
- ``InProcessComfy``: ComfyUI's own ``execution.validate_prompt`` and ``PromptExecutor`` in this
  process, with only core nodes and this pack loaded;
- ``ComfyServer``: ComfyUI's ``main.py`` as a subprocess on 127.0.0.1 with a temporary base
  directory, driven over HTTP and its websocket.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-ZImage-Turbo"


def comfy_root() -> Path:
    """The ComfyUI tree: $COMFYUI_PATH, else the one scripts/setup.sh unpacked."""
    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env)] if env else []
    marker = REPO / ".comfyui" / "path"
    if marker.is_file():
        candidates.append(Path(marker.read_text().strip()))
    candidates.append(REPO / ".comfyui" / "ComfyUI")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise RuntimeError(
        "No ComfyUI found. Run `bash scripts/setup.sh` (it unpacks ComfyUI 0.3.75 into .comfyui/), "
        "or set COMFYUI_PATH to a ComfyUI checkout.")


def link_pack(custom_nodes: Path) -> Path:
    """Place this pack in a custom_nodes folder exactly as a user installs it (a link)."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


@dataclass
class RunResult:
    prompt_id: str
    success: bool
    outputs: dict[str, Any]
    messages: list[tuple[str, dict]]
    progress: list[tuple[str, int, int]] = field(default_factory=list)

    def events(self, name: str) -> list[dict]:
        return [d for (e, d) in self.messages if e == name]

    @property
    def error(self) -> dict | None:
        errs = self.events("execution_error")
        return errs[0] if errs else None

    @property
    def interrupted(self) -> bool:
        return bool(self.events("execution_interrupted"))


_IMPORT_BASE: Path | None = None


def ensure_comfy_importable(base_dir: Path, extra_argv: list[str] | None = None) -> Path:
    """Put ComfyUI on sys.path and parse its command line once (CPU when there is no GPU).

    ComfyUI reads its arguments and base directory at import time, so the first caller fixes
    them for the whole process."""
    global _IMPORT_BASE
    root = comfy_root()
    if _IMPORT_BASE is not None:
        return root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options
    comfy.options.enable_args_parsing()
    argv = [str(root / "main.py"), "--base-directory", str(base_dir),
            "--disable-api-nodes", "--database-url", "sqlite:///:memory:"]
    import torch
    if not torch.cuda.is_available():
        argv.append("--cpu")
    argv += extra_argv or []
    saved = sys.argv
    sys.argv = argv
    try:
        import comfy.cli_args  # noqa: F401  (parses sys.argv once)
    finally:
        sys.argv = saved
    _IMPORT_BASE = base_dir
    return root


class _StubServer:
    """What PromptExecutor needs of a PromptServer: it collects the messages instead of sending."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.messages: list[tuple[str, dict]] = []
        self.sockets_metadata: dict = {}
        self.routes = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data if isinstance(data, dict) else {"data": data}))

    def queue_updated(self):
        pass


class InProcessComfy:
    """The real ComfyUI executor in this process (one per process: ComfyUI keeps global state)."""

    _instance: "InProcessComfy | None" = None

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.root = ensure_comfy_importable(base_dir)
        import utils.extra_config  # noqa: F401  (ComfyUI imports it before nodes)
        import nodes
        import execution
        import comfy.utils
        self.nodes, self.execution = nodes, execution
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        pack = link_pack(self.root / "custom_nodes")
        ok = asyncio.run(nodes.load_custom_node(str(pack)))
        if not ok:
            raise RuntimeError(f"ComfyUI failed to load the pack from {pack}")
        self.server = _StubServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0.0})
        self._progress: list[tuple[str, int, int]] = []

        def hook(value, total, preview, prompt_id=None, node_id=None):
            # As main.py's hijack_progress: the running node from the executing context, the interruption
            # check, then the progress state and a "progress" message to the client.
            import comfy.model_management
            try:
                from comfy_execution.utils import get_executing_context
                from comfy_execution.progress import get_progress_state
            except ImportError:  # older ComfyUI
                get_executing_context = get_progress_state = None
            context = get_executing_context() if get_executing_context is not None else None
            if context is not None:
                prompt_id = prompt_id or context.prompt_id
                node_id = node_id or context.node_id
            node_id = node_id or self.server.last_node_id
            self._progress.append((node_id or "", int(value), int(total)))
            comfy.model_management.throw_exception_if_processing_interrupted()
            if get_progress_state is not None and node_id:
                get_progress_state().update_progress(node_id, value, total, None)
            self.server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                               "node": node_id})
            if self.on_progress is not None:
                self.on_progress(node_id, value, total)

        self.on_progress = None
        comfy.utils.set_progress_bar_global_hook(hook)

    @classmethod
    def get(cls, base_dir: Path) -> "InProcessComfy":
        if cls._instance is None:
            cls._instance = InProcessComfy(base_dir)
        elif cls._instance.base_dir != base_dir:
            raise RuntimeError("one in-process ComfyUI per test process")
        return cls._instance

    def validate(self, prompt: dict) -> tuple[bool, dict, list, dict]:
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), copy.deepcopy(prompt), None))

    def run(self, prompt: dict, *, on_progress=None) -> RunResult:
        """Validate then execute an API-format prompt; raise if validation fails."""
        prompt = copy.deepcopy(prompt)
        valid, err, outputs, node_errors = self.validate(prompt)
        if not valid:
            raise AssertionError(f"prompt did not validate: {err} {json.dumps(node_errors)[:2000]}")
        pid = str(uuid.uuid4())
        self.server.messages = []
        self._progress = []
        self.on_progress = on_progress
        try:
            self.executor.execute(prompt, pid, {"client_id": "test"}, outputs)
        finally:
            self.on_progress = None
        return RunResult(pid, self.executor.success, dict(self.executor.history_result.get("outputs", {})),
                         list(self.server.messages), list(self._progress))

    def node_class(self, node_id: str):
        return self.nodes.NODE_CLASS_MAPPINGS[node_id]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's real main.py on 127.0.0.1 with a temporary base directory."""

    def __init__(self, base_dir: Path, models_dir: Path | None = None, extra_args: list[str] | None = None,
                 env: dict | None = None) -> None:
        self.root = comfy_root()
        self.base_dir = base_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base_dir.mkdir(parents=True, exist_ok=True)
        link_pack(base_dir / "custom_nodes")
        if models_dir is not None and not (base_dir / "models").exists():
            (base_dir / "models").symlink_to(models_dir, target_is_directory=True)
        settings = base_dir / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        if not settings.exists():
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        import torch
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(base_dir),
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes"]
        if not torch.cuda.is_available():
            args.append("--cpu")
        args += extra_args or []
        self.log_path = base_dir / "server.log"
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(args, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, start_new_session=True)
        self.client_id = str(uuid.uuid4())
        self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 120.0) -> None:
        import requests
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ComfyUI server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def get(self, path: str):
        import requests
        r = requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, payload: dict | None = None):
        import requests
        return requests.post(self.url + path, json=payload or {}, timeout=30)

    def queue(self, prompt: dict, extra_pnginfo: dict | None = None) -> str:
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_pnginfo is not None:
            body["extra_data"] = {"extra_pnginfo": extra_pnginfo}
        r = self.post("/prompt", body)
        if r.status_code != 200:
            raise AssertionError(f"/prompt refused ({r.status_code}): {r.text[:4000]}")
        return r.json()["prompt_id"]

    def run(self, prompt: dict, extra_pnginfo: dict | None = None, timeout: float = 600.0,
            on_message=None) -> tuple[dict, list[dict]]:
        """Queue a prompt, follow the websocket until it ends; return (history entry, messages)."""
        import websocket
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                         timeout=timeout)
        messages: list[dict] = []
        try:
            pid = self.queue(prompt, extra_pnginfo)
            t0 = time.time()
            while time.time() - t0 < timeout:
                raw = ws.recv()
                if isinstance(raw, bytes):
                    continue  # previews
                msg = json.loads(raw)
                messages.append(msg)
                if on_message is not None:
                    on_message(msg)
                data = msg.get("data", {})
                if data.get("prompt_id") != pid:
                    continue
                if msg["type"] in ("execution_error", "execution_interrupted", "execution_success"):
                    break
                if msg["type"] == "executing" and data.get("node") is None:
                    break
            else:
                raise AssertionError(f"prompt {pid} did not finish in {timeout}s")
        finally:
            ws.close()
        for _ in range(100):
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                return hist[pid], messages
            time.sleep(0.1)
        raise AssertionError(f"prompt {pid} not in /history")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def copy_models(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
