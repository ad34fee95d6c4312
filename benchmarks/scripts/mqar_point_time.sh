#!/usr/bin/env bash
# Tokens/s of single MQAR sweep points alone on the GPU, `auto` kernels against the XLA reference forms (float32,
# as the sweeps train): which path the tiny models' sweeps should take. 80 steps a point, one process.
# Usage (on the GPU machine, repository root): OUT=... bash benchmarks/scripts/mqar_point_time.sh
export PYTHONUNBUFFERED=1 PYTHONPATH=.
point() {  # $1 run-name regex, $2 label, rest: --set overrides
  local only=$1 label=$2; shift 2
  local line
  line=$(timeout 120 python3 -m train.sweep --config configs/zoology/figure2_zoology.yaml --budget session \
    --only "$only" --out /tmp/pt-$RANDOM --set steps=80 --set eval_every=0 --set log.every=10 \
    --set log.progress=plain --set checkpoint.enabled=false "$@" 2>&1 | grep -E "^done at step|rror" | tail -1)
  printf "%-34s %-10s %s\n" "$only" "$label" "$line"
}
# attention (measured 2026-12-06: the XLA form is 4.7-12x faster; both sweep files take it) only with POINT_ATTENTION=1
if [ -n "$POINT_ATTENTION" ]; then
  for run in 'attention-L64_kv4-d128-lr1.0e-02' 'attention-L256_kv16-d256-lr1.0e-02'; do
    point "^$run" auto --set model.implementation.attention=auto  # explicit: the sweep files set reference
    point "^$run" reference --set model.implementation.attention=reference
  done
fi
for run in 'based-L256_kv16-d128-lr1.0e-02'; do
  point "^$run" auto --set model.implementation.based=auto  # explicit: the sweep files set quadratic
  point "^$run" reference --set model.implementation.based=reference
  point "^$run" quadratic --set model.implementation.based=quadratic
done
for run in 'h3-L256_kv16-d128-lr1.0e-02' 'hyena-L256_kv16-d128-lr1.0e-02'; do
  point "^$run" auto --set model.implementation.long_conv=auto
  point "^$run" direct --set model.implementation.long_conv=direct
done
