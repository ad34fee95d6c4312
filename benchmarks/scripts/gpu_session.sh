#!/usr/bin/env bash
# One GPU call's work, by step name (several in one call: `bash gpu_session.sh lc_bench zoo:420+lc_tests`):
#   lc_bench            python -m benchmarks long_conv (pallas, reference, direct), alone on the GPU
#   lc_tests            the long_conv GPU tests (kernel, layers, mixers)
#   zoo:S / based:S     S seconds of the figure2_zoology / figure2_based `session` sweeps, 4 processes, resumed
#                       from docs/zoology/<sweep>-session.jsonl; results copied to $OUT
#   new_bench           the new kernels' acceptance rows: packed-document attention, Monarch MLP headline
#   new_tests           the new kernels' GPU tests: attention (documents, head dims, Hopper), monarch, lolcats
#   A+B                 A in the background while B runs (for steps that do not time anything)
# Logs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
nvidia-smi -L > $OUT/device.log; python3 -c "import jax; print(jax.__version__, jax.devices())" >> $OUT/device.log

sweep() {  # $1 sweep name, $2 seconds
  local dir=runs/$1-session
  mkdir -p $dir; [ -f $dir/results.jsonl ] || cp docs/zoology/$1-session.jsonl $dir/results.jsonl 2>/dev/null
  for i in 0 1 2 3; do
    python3 -m train.sweep --config configs/zoology/$1.yaml --budget session --shard $i/4 --time-limit $2 \
      --set log.progress=plain > $OUT/$1-$i.log 2>&1 &
  done; wait
  cp $dir/results.jsonl $OUT/$1-session.jsonl; wc -l $OUT/$1-session.jsonl
}
step() {
  case "$1" in
    lc_bench) timeout 120 python3 -m benchmarks long_conv --impls pallas reference direct 2>&1 \
                | tail -30 | tee $OUT/long_conv_bench.log ;;
    lc_tests) timeout 240 python3 -m pytest -v -p no:xdist -p no:cacheprovider -m gpu \
                tests/pallas_kernels/test_long_conv_kernel.py tests/pallas_kernels/test_long_conv_layers.py \
                tests/jaxlm/test_mixers_recurrent.py > $OUT/long_conv_tests.log 2>&1
              grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/long_conv_tests.log | tail -25 ;;
    new_bench)
      timeout 100 python3 -m benchmarks attention --shapes documents --impls hopper pallas --repeats 10 2>&1 \
        | tail -24 | tee $OUT/attention_documents_bench.log
      timeout 80 python3 -m benchmarks monarch --shapes headline --impls pallas xla --repeats 10 2>&1 \
        | tail -16 | tee $OUT/monarch_bench.log ;;
    new_tests) timeout 270 python3 -m pytest -v -n 4 -p no:cacheprovider -m gpu \
                 tests/pallas_kernels/test_attention_documents.py tests/pallas_kernels/test_attention_head_dims.py \
                 tests/pallas_kernels/test_attention_hopper.py tests/pallas_kernels/test_monarch_kernel.py \
                 tests/pallas_kernels/test_lolcats_kernel.py > $OUT/new_tests.log 2>&1
               grep -E " PASSED| FAILED| ERROR" $OUT/new_tests.log | sed 's/.*\] //' | awk '{print $1}' | sort | uniq -c
               grep -E "FAILED|ERROR" $OUT/new_tests.log | head -30 ;;
    zoo:*) sweep figure2_zoology ${1#zoo:} ;;
    based:*) sweep figure2_based ${1#based:} ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
}
for s in "$@"; do
  if [[ $s == *+* ]]; then step "${s%%+*}" & bg=$!; step "${s#*+}"; wait $bg; else step "$s"; fi
done
