#!/usr/bin/env bash
# Issue 20's demonstration on SmolLM2-135M-Instruct, over several GPU calls on ONE warm machine (a call carries at
# most 64 MiB; the model is a 94 MiB GGUF file, so it travels in two parts, kept outside the repository between
# calls: the next call must come within the machine's 30 s idle window, or start again from `a`).
# Prepare here (git-ignored): .smol/a/part_aa (56 MiB), .smol/b/{part_ab, model.sha256, gguf wheel}, data/linux-doc
# (docs/training.md: GGUF files and real English text). Then, call by call:
#   carry [".smol/a"]:          bash benchmarks/scripts/lolcats_demo.sh a
#   carry [".smol/b", "data/linux-doc"]:  bash benchmarks/scripts/lolcats_demo.sh b teacher transfer
#                               (b joins, checks, imports; 39 + 21 MiB carried with the 2.3 MiB tree)
#   (nothing carried):          bash benchmarks/scripts/lolcats_demo.sh lora eval
#                               bash benchmarks/scripts/lolcats_demo.sh scratch
#                               bash benchmarks/scripts/lolcats_demo.sh decode
# Logs under $OUT; runs/ stays on the machine between calls (ignored paths are kept while it is warm).
# A rehearsal on CPU at toy size (every step's command, minutes): DEMO_EVAL="--seq-len 128 --batch-size 1 --batches 1"
# DEMO_SET="transfer.steps=2 lora.steps=2 batch_size=1 data.seq_len=128 eval_batches=1"
# DEMO_SCRATCH_SET="steps=2 batch_size=1 data.text.seq_len=128 eval_every=2 eval_batches=1" DEMO_GEN="--batch 2
# --prompt-len 16 --new-tokens 16" OUT=/tmp/demo bash benchmarks/scripts/lolcats_demo.sh a b teacher transfer lora eval scratch decode
set -eo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.:/root/pylib
TEACHER=runs/smollm2-135m
STUDENT=runs/smollm2-135m-lolcats
SCRATCH=runs/smollm2_135m_lolcats_scratch  # the scratch config's name
EVAL=${DEMO_EVAL:---batches 32} SET=${DEMO_SET:-} SCRATCH_SET=${DEMO_SCRATCH_SET:-}
for step in "$@"; do
  case "$step" in
    a) mkdir -p /root/smol && cp .smol/a/part_aa /root/smol/ && ls -la /root/smol ;;
    b) cat /root/smol/part_aa .smol/b/part_ab > /root/smol/model.gguf && sha256sum -c .smol/b/model.sha256
       python3 -m pip install -q --no-deps --no-index --target /root/pylib .smol/b/gguf-*.whl
       python3 -m train.convert gguf-import --gguf /root/smol/model.gguf --out $TEACHER 2>&1 | tail -5 | tee $OUT/import.log
       python3 -m jaxlm.generate --run $TEACHER --prompt "The Linux kernel is" --temperature 0 --max-new-tokens 30 \
         --stop 2 2>&1 | tail -3 | tee -a $OUT/import.log ;;
    teacher) python3 -m train.linearize eval --run $TEACHER --data data/linux-doc $EVAL 2>&1 | tail -3 \
               | tee $OUT/teacher_eval.log ;;
    transfer) timeout 560 python3 -m train.linearize --config configs/lolcats/smollm2_135m.yaml --stage transfer $SET \
                2>&1 | tail -25 | tee $OUT/transfer.log ;;
    lora) timeout 560 python3 -m train.linearize --config configs/lolcats/smollm2_135m.yaml --stage lora $SET 2>&1 \
            | tail -25 | tee $OUT/lora.log ;;
    eval) for run in $STUDENT/stage1 $STUDENT; do
            python3 -m train.linearize eval --run $run --data data/linux-doc $EVAL 2>&1 | tail -2
          done | tee $OUT/student_eval.log
          cp $STUDENT/summary.json $OUT/ 2>/dev/null || true ;;
    scratch) timeout 560 python3 -m train --config configs/lolcats/smollm2_135m_scratch.yaml $SCRATCH_SET 2>&1 | tail -20 \
               | tee $OUT/scratch.log
             python3 -m train.linearize eval --run $SCRATCH --data data/linux-doc $EVAL 2>&1 | tail -2 \
               | tee -a $OUT/scratch.log ;;
    decode) for run in $TEACHER $STUDENT; do
              timeout 250 python3 -m jaxlm.generate --run $run --dtype bfloat16 --benchmark ${DEMO_GEN:---batch max --setting 128+2048} 2>&1 | tail -12
            done | tee $OUT/decode.log ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
