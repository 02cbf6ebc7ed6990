#!/usr/bin/env bash
# Builds .cache/gpurun/: what the GPU benchmarks need on a machine with no network and no setup, to be
# carried there next to the working tree (the lent GPU machines have torch, transformers, safetensors,
# einops and psutil, but not diffusers or ComfyUI):
#   .cache/gpurun/ComfyUI   the ComfyUI tree setup.sh unpacked, without its tests and the tokenizers
#                           Z-Image does not use (qwen25_tokenizer stays), so the bundle stays small
#   .cache/gpurun/whl       cp312 manylinux wheels of diffusers and what the benchmarks import that the
#                           machine lacks (torchsde/trampoline for ComfyUI's samplers, importlib_metadata,
#                           pytest for the gpu-marked tests; the machine's packaging is used);
#                           ZIMAGE_BUNDLE_AV=1 adds av (ComfyUI's nodes.py, i.e. the in-process executor)
# On the GPU machine, in the repository root:
#   source scripts/device_env.sh      # installs the wheels into /tmp/site, sets PYTHONPATH and COMFYUI_PATH
# Run after `bash scripts/setup.sh` (it needs the unpacked ComfyUI and pip).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.cache/gpurun"
SRC="$(cat "$ROOT/.comfyui/path" 2>/dev/null || echo "$ROOT/.comfyui/ComfyUI")"
[ -f "$SRC/main.py" ] || { echo "no ComfyUI at $SRC: run bash scripts/setup.sh first" >&2; exit 1; }
mkdir -p "$OUT/whl"
rm -rf "$OUT/ComfyUI"
rsync -a --exclude tests --exclude tests-unit --exclude 'custom_nodes/*' --exclude '__pycache__' \
  --exclude 'comfy/text_encoders/*_tokenizer' "$SRC/" "$OUT/ComfyUI/"
cp -r "$SRC/comfy/text_encoders/qwen25_tokenizer" "$OUT/ComfyUI/comfy/text_encoders/"
pkgs=(diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2 importlib_metadata==10.2.0 zipp==4.1.2
      pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0)  # the gpu-marked tests
[ "${ZIMAGE_BUNDLE_AV:-0}" = "1" ] && pkgs+=(av==16.0.1)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$OUT/whl" "${pkgs[@]}"
du -sh "$OUT"
