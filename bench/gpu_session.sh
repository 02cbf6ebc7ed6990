#!/usr/bin/env bash
# What the open issues (#3 loader, #6 sampler) still need measured, in priority order, as two device calls of at
# most 10 minutes each. Run through `device` with carry [".cache/gpurun"] (scripts/device_bundle.sh); make the
# second call right after the first, while the machine is still warm, so the weights in /tmp/zw are reused:
#
#     bash bench/gpu_session.sh card [seconds, default 570]
#     bash bench/gpu_session.sh rest [seconds, default 570]
#     bash bench/gpu_session.sh tune [seconds, default 570]
#
# Results go to $OUT (the device's output folder; /tmp/gpu_session elsewhere), one file per step, plus
# session-<part>.log. A step starts only when its usual time is left, and is cut off at the budget's end.
# card: full-size weights written in the background (~80 s) while bench/graph_check.py (~60 s, no files)
#       compares the CUDA-graph loop with the plain compiled loop; then bench_pipeline.py with ours_b4 (batch 1,
#       then batch 4), ours_graph_b4, ComfyUI, diffusers, ours_fp8_graph, ours_fp8_fa3_graph (fp8 matmuls, FA3's
#       fp8 attention with static q/k scales, CUDA graphs: the candidate for the 56 ms fp8 target) and ours_fp8
#       on the whole card (in that order: a run cut off at the time limit keeps the rows measured so far, in
#       card.json). FA3 comes from .cache/gpurun/extra (fa3-fwd); without it the fa3 row reports an error.
#       With it, the ours* rows use fa3 by the nodes' `auto` rule (Hopper + FA3 installed), as users would.
# rest: the weights (unless still there), load_profile.py (where the warm load's time goes), ours_graph and
#       ComfyUI under cudaMallocAsync (ComfyUI's default allocator), then the whole-forward graph lab.
# tune: no files. The gpu-marked graph, reader and fp8-attention tests (a recording beside a thread polling
#       device memory; the reader bit for bit on CUDA with its allocation thread; FA3's fp8 forward within fp8
#       rounding, compiled in one graph), then graph_check.py with fp8 matmuls, the same with FA3's fp8
#       attention, then with inductor's multi_kernel (one-pass variants of the
#       row reductions that quantize activations, picked at run time) and coordinate-descent tuning, in fp8
#       and in bf16: the "other" kernels are about twice their memory-traffic floor (BENCHMARKS, sampler).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-/tmp/gpu_session}"
mkdir -p "$OUT"
PART="${1:-card}"
BUDGET="${2:-570}"
WEIGHTS=/tmp/zw
case "$PART" in card|rest|tune) ;; *) echo "usage: bash bench/gpu_session.sh card|rest|tune [seconds]" >&2; exit 2 ;; esac
TUNED='{"triton.multi_kernel": 1, "coordinate_descent_tuning": true}'
exec > >(tee -a "$OUT/session-$PART.log") 2>&1

left() { echo $((BUDGET - SECONDS)); }
step() {  # step NAME SECONDS_NEEDED command...
  local name=$1 need=$2
  shift 2
  if [ "$(left)" -lt "$need" ]; then
    echo "[session] skipped $name: needs ~${need}s, $(left)s left"
    return 0
  fi
  echo "[session] $(date +%T) $name ($(left)s left)"
  timeout --signal=INT --kill-after=10 "$(( $(left) - 5 ))" "$@"
  echo "[session] $name rc=$? at ${SECONDS}s"
}

source scripts/device_env.sh || { echo "[session] device_env.sh failed (is .cache/gpurun carried?)"; exit 3; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if [ "$PART" = tune ]; then
  step gpu_tests 120 python3 -m pytest -q tests/unit/test_graphs.py tests/unit/test_fastread.py \
    tests/gpu/test_attention_gpu.py -m gpu
  step graph_check_fp8 90 python3 bench/graph_check.py --fp8 --out "$OUT/graph_check_fp8.json"
  step graph_check_fp8_attn 120 python3 bench/graph_check.py --fp8 --attention fa3 --fp8-attention \
    --out "$OUT/graph_check_fp8_attn.json"
  step graph_check_fp8_tuned 180 python3 bench/graph_check.py --fp8 --options "$TUNED" --out "$OUT/graph_check_fp8_tuned.json"
  step graph_check_tuned 150 python3 bench/graph_check.py --options "$TUNED" --out "$OUT/graph_check_tuned.json"
  echo "[session] $PART done at ${SECONDS}s"
  exit 0
fi
python3 -c "
import sys; sys.path.insert(0, '.')
from zimage_nodes.testing import weights
weights.ensure_single_files(__import__('pathlib').Path('$WEIGHTS') / 'models')
" > "$OUT/weights-$PART.log" 2>&1 &
GEN=$!
if [ "$PART" = card ]; then
  step graph_check 90 python3 bench/graph_check.py --out "$OUT/graph_check.json"
  wait $GEN
  echo "[session] weights ready at ${SECONDS}s (rc=$?)"
  step bench_pipeline 300 python3 bench/bench_pipeline.py --weights "$WEIGHTS" --runs 2 --caps 0 \
    --peers ours_b4,ours_graph_b4,comfy,diffusers,ours_fp8_graph,ours_fp8_fa3_graph,ours_fp8 --out "$OUT/card.md"
else
  wait $GEN
  echo "[session] weights ready at ${SECONDS}s (rc=$?)"
  step load_profile 120 python3 bench/load_profile.py --weights "$WEIGHTS" --out "$OUT/load_profile.json"
  step bench_pipeline_async 150 python3 bench/bench_pipeline.py --weights "$WEIGHTS" --runs 2 --caps 0 \
    --alloc async --peers ours_graph,comfy --out "$OUT/card_async.md"
  step graph_lab 150 python3 bench/dit_speed_lab.py --graph-lab --out "$OUT"
fi
echo "[session] $PART done at ${SECONDS}s"
