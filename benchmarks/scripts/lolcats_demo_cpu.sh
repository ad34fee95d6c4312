#!/usr/bin/env bash
# Issue 20's demonstration scaled to a 2-core CPU (about 80 minutes), while the GPU one (lolcats_demo.sh) waits
# for a machine: SmolLM2-135M-Instruct linearized on ~0.2M tokens of linux-doc (rows of 512, batch 2; the GPU
# recipe uses ~20M), against the same lolcats architecture trained from scratch on as many tokens.
# Usage: bash benchmarks/scripts/lolcats_demo_cpu.sh GGUF_FILE OUT_DIR   (data/linux-doc prepared as in
# docs/training.md; the gguf package installed)
set -eo pipefail
export PYTHONUNBUFFERED=1
GGUF=$1 OUT=$2
T=$OUT/teacher S=$OUT/student
STEPS=${STEPS:-100}  # per stage: 100 x 2 x 512 = 102k tokens; the scratch run takes both stages' 205k
SHAPE="batch_size=2 data.seq_len=512 eval_batches=16 log_every=25"
EVAL="--data data/linux-doc --seq-len 512 --batch-size 2 --batches 16"  # the same 16k held-out tokens
python -m train.convert gguf-import --gguf $GGUF --out $T 2>&1 | tail -1
python -m train.linearize eval --run $T $EVAL 2>&1 | tail -1
python -m train.linearize --config configs/lolcats/smollm2_135m.yaml --stage transfer teacher=$T out=$S \
  transfer.steps=$STEPS $SHAPE 2>&1 | grep -v WARNING
python -m train.linearize --config configs/lolcats/smollm2_135m.yaml --stage lora teacher=$T out=$S \
  lora.steps=$STEPS $SHAPE 2>&1 | grep -v WARNING
python -m train --config configs/lolcats/smollm2_135m_scratch.yaml steps=$((2 * STEPS)) batch_size=2 \
  data.text.seq_len=512 optim.warmup_steps=20 eval_every=$STEPS eval_batches=16 log.every=25 log.progress=plain \
  run_dir=$OUT/scratch 2>&1 | grep -v WARNING | tail -30
for run in $S/stage1 $S $OUT/scratch; do python -m train.linearize eval --run $run $EVAL 2>&1 | tail -1; done
for run in $T $S; do
  python -m jaxlm.generate --run $run --prompt "The Linux kernel is" --temperature 0 --max-new-tokens 40 --stop 2 \
    2>&1 | tail -2
done
