#!/usr/bin/env bash
# Issue 14 GPU check: the Hopper tests on the refactored tree, then old (.old = 9e77f15) vs new kernel timings,
# interleaved new/old/new in one run.
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi -L | tee $OUT/device.log
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a $OUT/device.log
ATT="B4-S4096-H16-D128-causal B1-S8192-H16-D128-causal-W256"
BAS="B8-T2048-H16-F16-D64 B2-T16384-H16-F16-D64"
bench() {  # $1 tree, $2 label
  (cd $1 && PYTHONPATH=. timeout 150 python3 -m benchmarks attention --impls hopper --peers --repeats 10 \
     --shapes $ATT --out /tmp/res-$2 2>&1 | tail -14) | sed "s/^/[$2] /" | tee -a $OUT/bench.log
  (cd $1 && PYTHONPATH=. timeout 120 python3 -m benchmarks based --impls hopper_parallel hopper --peers --repeats 10 \
     --shapes $BAS --out /tmp/res-$2 2>&1 | tail -10) | sed "s/^/[$2] /" | tee -a $OUT/bench.log
}
sweep() {  # $1 seconds
  for i in 0 1 2 3; do
    PYTHONPATH=. python3 -m train.sweep --config configs/zoology/figure2_zoology.yaml --budget session --shard $i/4 \
      --time-limit $1 --set log.progress=plain > $OUT/zoo-$i.log 2>&1 &
  done; wait
  cp runs/figure2_zoology-session/results.jsonl $OUT/ 2>/dev/null; tail -2 $OUT/zoo-*.log
}
case "$1" in
  a) PYTHONPATH=. timeout 290 python3 -m pytest -q -n 8 -m gpu --continue-on-collection-errors tests 2>&1 \
       | tail -60 > $OUT/gpu_tests.log; tail -5 $OUT/gpu_tests.log
     bench . new1; bench .old old ;;
  b) bench . new2; sweep 320 ;;
  c) sweep 520 ;;
  d) bench . new2; bench .old old2
     PYTHONPATH=. timeout 270 python3 -m pytest -v -n 8 -m gpu -p no:cacheprovider tests > $OUT/gpu_tests.log 2>&1
     grep -E "PASSED|FAILED|ERROR" $OUT/gpu_tests.log | sed 's/.*\] //' | sort | uniq -c | sort -rn | head -3
     grep -E "FAILED|ERROR" $OUT/gpu_tests.log | head -20 ;;
esac
