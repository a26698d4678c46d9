#!/usr/bin/env bash
# The GPU tests and benchmarks on a lent GPU machine (no network), resumable across calls while
# the machine stays warm: finished steps leave a mark in /tmp/thaw-run and are skipped next time.
#
#   bash tests/gpu/device_run.sh [BUDGET_S]
#   THAW_RUN_FIRST="test_tp" THAW_RUN_ONLY=1 bash tests/gpu/device_run.sh   # chosen steps only
#
# Needs, in the working tree: .stage/p3 (the vLLM 0.24.0 payload's last part; p1 and p2 parked in
# ~/stage by earlier calls, see ../shared/gpu-vllm/install.sh), .gpu/model8b (the 8B-shaped config
# with the default model's tokenizer files) and .gpu/wheels (langchain-core and its dependencies).
# Results and logs go to $OUT/run.tgz.
set -u
BUDGET=${1:-560}
T0=$(date +%s)
ROOT=$(pwd)
STATE=/tmp/thaw-run
OUTDIR=${OUT:-/tmp/thaw-out}
mkdir -p "$STATE/logs" "$STATE/results" "$OUTDIR"
export PYTHONPATH=/tmp/thaw-site:/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
# NVLink multicast can take a shared host's GPUs out of service: off (the machine's notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_ENABLE_V1_MULTIPROCESSING=0
# The checkout's thaw_agents/ (without accel/ and integrations/) must not shadow the installed copy
# in processes vLLM starts with `python -m` from this folder.
export PYTHONSAFEPATH=1
export THAW_GPU_MODEL=$ROOT/.gpu/model8b THAW_GPU_LOAD_FORMAT=dummy THAW_GPU_WEIGHTS_DIR=/var/tmp/thaw-bench-w8b
M=$ROOT/.gpu/model8b
BENCH=(python3 benchmarks/gpu_engine.py --model "$M" --out-dir "$STATE/results" --tag nvidia-h200)
PYTEST=(python3 -P -m pytest -q -p no:cacheprovider -rA)

left() { echo $((BUDGET - ($(date +%s) - T0))); }
step() {
  local name=$1
  shift
  if [ -e "$STATE/done.$name" ]; then echo "== $name: done in an earlier call"; return 0; fi
  local limit=$(($(left) - 25))
  if [ "$limit" -lt 40 ]; then echo "== $name: no time left"; return 1; fi
  echo "== $name (limit ${limit}s, $(date +%T))"
  local s=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$STATE/logs/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $(($(date +%s) - s))s"
  grep -E "^(==|\||[0-9]+ (passed|failed))|passed|failed|Error|error:|Traceback|assert" "$STATE/logs/$name.log" | tail -n 25
  [ "$rc" -eq 0 ] && touch "$STATE/done.$name"
  return 0
}
install() {
  set -e
  [ -d /tmp/site/vllm ] || bash .stage/p3/install.sh
  python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sys.argv[1:]]" .gpu/wheels/*.whl
  # This checkout as an installed package (accel/ and integrations/ are subpackages of thaw_agents,
  # and the dist-info carries the vllm.general_plugins entry point of load_format="thaw").
  rm -rf /tmp/thaw-site && mkdir -p /tmp/thaw-site/thaw_agents-0.1.0.dist-info
  cp -r thaw_agents /tmp/thaw-site/ && cp -r accel /tmp/thaw-site/thaw_agents/accel
  cp -r integrations /tmp/thaw-site/thaw_agents/integrations
  printf 'Metadata-Version: 2.1\nName: thaw-agents\nVersion: 0.1.0\n' >/tmp/thaw-site/thaw_agents-0.1.0.dist-info/METADATA
  printf '[vllm.general_plugins]\nthaw_agents_weights = thaw_agents._plugins:register\n' \
    >/tmp/thaw-site/thaw_agents-0.1.0.dist-info/entry_points.txt
  : >/tmp/thaw-site/thaw_agents-0.1.0.dist-info/RECORD
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  df -h /dev/shm /var/tmp | cat
}
smoke() {
  python3 -P -c "
import torch, cupy, vllm, thaw_agents
from thaw_agents import _compat
from thaw_agents.accel import check_cuda_data_path
check_cuda_data_path(0)
_compat.check_connector_interface()
print('vllm', vllm.__version__, 'torch', torch.__version__, torch.version.cuda, 'cupy', cupy.__version__,
      'thaw', thaw_agents.__file__, 'supported', _compat.is_supported())
"
}
pack() {
  mkdir -p "$STATE/pack/logs"
  for f in "$STATE"/logs/*.log; do tail -c 400000 "$f" >"$STATE/pack/logs/$(basename "$f")"; done
  cp -r "$STATE/results" "$STATE/pack/" 2>/dev/null
  ls "$STATE" >"$STATE/pack/state.txt"
  tar czf "$OUTDIR/run.tgz" -C "$STATE/pack" .
  cp "$STATE"/results/*.json "$OUTDIR/" 2>/dev/null
  ls -la "$OUTDIR"
}
trap pack EXIT
export -f install smoke

step install bash -c install || exit 1
[ -e "$STATE/done.install" ] || exit 1
step smoke bash -c smoke
if [ -n "${THAW_RUN_FIRST:-}" ]; then  # what to run first in a follow-up session
  for s in $THAW_RUN_FIRST; do
    case $s in
      test_weights) step test_weights "${PYTEST[@]}" "tests/gpu/test_gpu_engine.py::test_weights_freeze_and_thaw_restore" ;;
      bench_weights) step bench_weights "${BENCH[@]}" --eager --phases weights --weights-dir /var/tmp/thaw-bench-w8b --keep-weights ;;
      bench_hydrate) step bench_hydrate "${BENCH[@]}" --load-format dummy --phases hydrate rounds ;;
      test_hydrate) step test_hydrate "${PYTEST[@]}" "tests/gpu/test_gpu_engine.py::test_fork_hydrate_and_branches" ;;
      test_tp) step test_tp env THAW_GPU_RESULTS="$STATE/results" "${PYTEST[@]}" tests/gpu/test_gpu_tensor_parallel.py ;;
    esac
  done
  [ -n "${THAW_RUN_ONLY:-}" ] && { echo "== finished $(date +%T), $(($(date +%s) - T0))s"; exit 0; }
fi
step kvio "${PYTEST[@]}" tests/gpu/test_gpu_kvio.py tests/gpu/test_gpu_weights.py tests/unit/test_accel_gpu.py \
  tests/unit/test_blake3_kernel.py
step kvio_sweep python3 benchmarks/gpu_kvio.py --out "$STATE/results/gpu_kvio-nvidia-h200.json" \
  --env-out "$STATE/kv-env.sh"
# shellcheck disable=SC1091
[ -e "$STATE/kv-env.sh" ] && source "$STATE/kv-env.sh" && cat "$STATE/kv-env.sh"
step test_hydrate "${PYTEST[@]}" "tests/gpu/test_gpu_engine.py::test_fork_hydrate_and_branches"
step bench_hydrate "${BENCH[@]}" --load-format dummy --phases hydrate rounds
step test_chat "${PYTEST[@]}" "tests/gpu/test_gpu_engine.py::test_chat_thaw_concurrent"
step bench_chat "${BENCH[@]}" --load-format dummy --phases chat --max-model-len 2048
step test_weights "${PYTEST[@]}" "tests/gpu/test_gpu_engine.py::test_weights_freeze_and_thaw_restore"
step bench_weights "${BENCH[@]}" --eager --phases weights --weights-dir /var/tmp/thaw-bench-w8b --keep-weights
step bench_rounds_eager "${BENCH[@]}" --load-format dummy --phases rounds-eager
echo "== finished $(date +%T), $(($(date +%s) - T0))s"
