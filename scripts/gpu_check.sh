#!/usr/bin/env bash
# One command on a machine with one CUDA GPU (sized for an H100 or H200: at most 8.5 minutes of
# time limits in all):
#   1. the CUDA-only tests (graph replay = eager static steps, fused attention, stage calls under
#      torch.cuda.set_sync_debug_mode("error"));
#   2. CUDA-graph against eager static steps through the whole engine, event for event;
#   3. synchronisations per engine step beyond its sanctioned reads;
#   4. decode-step graph replay time per (rows, span) bucket (full-size decoder, random bf16 weights);
#   5. `bench engine` at 64/256/512 streams (full size, random bf16 weights), aligned and staggered starts,
#      next to `bench roofline`'s estimate.
# Every part has its own time limit; a failing part is reported and the others still run. Output also goes to
# $OUT (default gpu_check_out/). Usage: scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")' || exit 2
TINY=$(mktemp -d)/tiny
python cli.py make-tiny-checkpoint "$TINY" --with-tower > /dev/null
status=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep the output, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit} s)"
  local started=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || status=1
}
part cuda-tests 120 python -m pytest -q -p no:cacheprovider tests/test_sync_free_step.py \
  tests/test_decode_step.py tests/test_decoder.py
part engine-graphs 50 python scripts/gpu_checks.py engine-graphs "$TINY"
part sync-count 40 python scripts/gpu_checks.py sync-count "$TINY"
part replay-times 60 python scripts/gpu_checks.py replay-times
part bench-engine 120 python cli.py bench engine --device cuda --streams 64,256,512 --blocks 6 \
  --arrivals aligned --decode-steps cuda_graph
part bench-staggered-starts 100 python cli.py bench engine --device cuda --streams 64,256,512 --blocks 8 \
  --arrivals staggered-starts --decode-steps cuda_graph
part bench-roofline 20 python cli.py bench roofline
echo "gpu_check: $([ $status -eq 0 ] && echo 'all parts passed' || echo 'some part FAILED (see above)'); logs in $OUT/"
exit $status
