# Sourced on a lent GPU machine (no network) in the repository root, with .cache/gpurun carried there
# (scripts/device_bundle.sh builds it): installs the carried wheels into /tmp/site and points the
# benchmarks at the carried ComfyUI. Uses the machine's own python3 (its torch).
# .cache/gpurun/extra/*.whl (optional, e.g. fa3-fwd for the FlashAttention-3 peers) are installed too.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .cache/gpurun/whl/*.whl $(ls .cache/gpurun/extra/*.whl 2>/dev/null) || return 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
export COMFYUI_PATH="$PWD/.cache/gpurun/ComfyUI"
export PYTHONUNBUFFERED=1
