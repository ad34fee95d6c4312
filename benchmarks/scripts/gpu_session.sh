#!/usr/bin/env bash
# One GPU call's work, by step name (several in one call: `bash gpu_session.sh lc_bench zoo:420+lc_tests`):
#   lc_bench            python -m benchmarks long_conv (pallas, reference, direct), alone on the GPU
#   lc_tests            the long_conv GPU tests (kernel, layers, mixers), 420 s (240 s left the float32 cases unfinished)
#   lc_blocks           benchmarks/scripts/long_conv_blocks_time.py: the portable kernel's forward over block sizes
#   monarch_blocks      benchmarks/scripts/monarch_blocks_time.py: the portable Monarch kernel over block sizes
#   zoo:S / based:S     S seconds of the figure2_zoology / figure2_based `session` sweeps (`rest`: the call's CALL_S,
#                       default 585, less 45 s and the time spent so far), 4 processes, resumed
#                       from docs/zoology/<sweep>-session.jsonl; results copied to $OUT; SWEEP_SET="K=V ..." adds
#                       --set overrides (e.g. model.implementation.based=reference); SWEEP_ROOT (default runs) holds
#                       the sweeps' folders: /tmp/sweeps outlives the `.clean` copy, so a run cut by the time limit
#                       goes on from its checkpoint in the next call to the same warm machine
#   persistent          the persistent Hopper attention forward: its GPU tests (240 s), then its rows beside the
#                       CTA-per-tile forward (packed documents, B4 S4096 causal)
#   profile             the kernels of the rows whose speed targets are missed (attention with documents, Monarch,
#                       long_conv, BASED at T65536): python -m benchmarks ... --profile, one log per op
#   train:M             python -m train, preset M on configs/train/transformer_360m_synthetic.yaml's settings (TRAIN_S
#                       240 s, TRAIN_SET overrides): tokens/s, MFU, and 3 steps' kernels (log.profile_steps)
#   point_time          benchmarks/scripts/mqar_point_time.sh: single sweep points alone, auto against XLA forms
#   pick                point_time, then the fastest path per op added to SWEEP_SET for the later steps, and kept in
#                       $SWEEP_ROOT/sweep_set for later calls to the same warm machine (read when SWEEP_SET is unset)
#   new_bench           the new kernels' acceptance rows: packed-document attention (and its ranges' search alone),
#                       Monarch MLP headline
#   att_tests           the attention GPU tests (documents, head dims, Hopper); new_tests: monarch (the Hopper
#                       forward's alone first, 120 s) and lolcats;
#   based_tests         the BASED kernels' and the kernel switch's GPU tests
#   lc_hopper           the Hopper long_conv forward's GPU tests (180 s), then its rows against XLA's FFT
#   based_bwd           the Hopper chunked BASED backward's GPU tests (150 s), then fwd_bwd rows: hopper with the
#                       portable and with the Hopper backward, hopper_parallel, fla (needs .peers carried)
#   decode_tests        every test (not only those marked gpu) of the attention layer, chunked prefill and the
#                       BASED decode kernel: on the GPU they take the Triton decode kernels
#   gen:M1,M2           python -m jaxlm.generate --benchmark for presets M1, M2 (e.g. gen:based-360m,transformer-360m):
#                       --batch max at 1024+1024, 128+2048, 128+4096 (GEN_SETTINGS), one process of at most GEN_S
#                       (200) seconds each, prefill in pieces of 256, one timed round
#   breakdown:M@B       benchmarks/scripts/decode_breakdown.py: preset M's decode step split by part at batch B
#   monarch_speed       GPT-2-medium-Monarch training tokens/s, with Monarch and with dense MLPs (issue 19)
#   monarch_text        GPT-2 small dense / Monarch MLPs / all Monarch on linux-doc (carry data/linux-doc), eval loss
#                       vs training time: TEXT_VARIANTS, TEXT_S (250 s each), TEXT_SET (overrides), a PNG, a table, the runs'
#                       metrics
#   A+B                 A in the background while B runs (for steps that do not time anything)
# Logs under $OUT.
set -o pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=.
[ -z "${SWEEP_SET+set}" ] && [ -f ${SWEEP_ROOT:-runs}/sweep_set ] && SWEEP_SET=$(cat ${SWEEP_ROOT:-runs}/sweep_set)
nvidia-smi -L > $OUT/device.log; python3 -c "import jax; print(jax.__version__, jax.devices())" >> $OUT/device.log

sweep() {  # $1 sweep name, $2 seconds; one log back per sweep (the machine returns at most 8 files)
  local limit=$2; [ "$limit" = rest ] && limit=$(( ${CALL_S:-585} - 45 - SECONDS ))
  local dir=${SWEEP_ROOT:-runs}/$1-session
  mkdir -p $dir; [ -f $dir/results.jsonl ] || cp docs/zoology/$1-session.jsonl $dir/results.jsonl 2>/dev/null
  local pids=()  # its own shards only: a bare `wait` would also wait for an `A+B` step's background A, and reap it
  for i in 0 1 2 3; do
    python3 -m train.sweep --config configs/zoology/$1.yaml --budget session --shard $i/4 --time-limit $limit --out $dir \
      --set log.progress=plain ${SWEEP_SET:+$(printf -- '--set %s ' $SWEEP_SET)} > /tmp/$1-$i.log 2>&1 & pids+=($!)
  done; wait "${pids[@]}"
  for i in 0 1 2 3; do echo "== shard $i"; grep -E "^\[|error|Error" /tmp/$1-$i.log | tail -n 40; done > $OUT/$1.log
  cp $dir/results.jsonl $OUT/$1-session.jsonl; wc -l $OUT/$1-session.jsonl
}
gpu_tests() {  # $1 name, $2 seconds, test files...: one log each, verdict counts printed; the tests marked gpu
  local name=$1 limit=$2 mark=(-m gpu); shift 2  # only, unless ALL_TESTS is set
  [ -n "${ALL_TESTS:-}" ] && mark=()
  timeout $limit python3 -m pytest -v -n 4 -p no:cacheprovider "${mark[@]}" "$@" > $OUT/$name.log 2>&1
  echo "$name (rc $?):"; grep -oE "(PASSED|FAILED|ERROR)" $OUT/$name.log | sort | uniq -c
  grep -E "^(FAILED|ERROR) " $OUT/$name.log | head -20
}
step() {
  case "$1" in
    lc_bench) timeout 120 python3 -m benchmarks long_conv --impls pallas reference direct 2>&1 \
                | tail -45 | tee $OUT/long_conv_bench.log ;;
    lc_blocks) timeout 180 python3 benchmarks/scripts/long_conv_blocks_time.py 2>&1 | grep -E "^B[0-9]" \
                 | tee $OUT/long_conv_blocks.log ;;
    monarch_blocks) timeout 240 python3 benchmarks/scripts/monarch_blocks_time.py 2>&1 | grep -E "^T[0-9]" \
                      | tee $OUT/monarch_blocks.log ;;
    lc_tests) gpu_tests long_conv_tests 420 tests/pallas_kernels/test_long_conv_kernel.py \
                tests/pallas_kernels/test_long_conv_layers.py tests/jaxlm/test_mixers_recurrent.py ;;
    new_bench)
      timeout 100 python3 -m benchmarks attention --shapes documents --impls hopper pallas --repeats 10 2>&1 \
        | tail -24 | tee $OUT/attention_documents_bench.log
      timeout 40 python3 benchmarks/scripts/document_ranges_time.py 2>&1 | tail -2 | tee -a $OUT/attention_documents_bench.log
      timeout 80 python3 -m benchmarks monarch --shapes headline --impls pallas xla --repeats 10 2>&1 \
        | tail -16 | tee $OUT/monarch_bench.log
      # The Hopper forward has never run: alone and short, so that a hang costs one minute and no other row.
      timeout 60 python3 -m benchmarks monarch --shapes headline --impls hopper --repeats 10 2>&1 \
        | tail -12 | tee -a $OUT/monarch_bench.log ;;
    att_tests) gpu_tests att_tests 400 tests/pallas_kernels/test_attention_documents.py \
                 tests/pallas_kernels/test_attention_head_dims.py tests/pallas_kernels/test_attention_hopper.py ;;
    decode_tests) ALL_TESTS=1 gpu_tests decode_tests 300 tests/jaxlm/test_layers_attention_mlp.py \
                    tests/jaxlm/test_generate_chunked.py tests/pallas_kernels/test_based_decode_kernel.py ;;
    new_tests) gpu_tests monarch_hopper_tests 120 tests/pallas_kernels/test_monarch_hopper.py  # first run: short
               gpu_tests new_tests 300 tests/pallas_kernels/test_monarch_kernel.py \
                 tests/pallas_kernels/test_lolcats_kernel.py ;;
    based_tests) gpu_tests based_tests 400 tests/pallas_kernels/test_based_kernel.py \
                   tests/pallas_kernels/test_based_hopper_chunked.py tests/pallas_kernels/test_based_hopper_chunked_bwd.py \
                   tests/pallas_kernels/test_based_hopper_parallel.py \
                   tests/pallas_kernels/test_based_decode_kernel.py tests/jaxlm/test_kernel_switch.py ;;
    lc_hopper) # the Hopper long_conv forward, never run: its tests alone and short, then its rows against XLA's FFT
      gpu_tests long_conv_hopper_tests 180 tests/pallas_kernels/test_long_conv_hopper.py
      timeout 120 python3 -m benchmarks long_conv --impls hopper reference 2>&1 | tail -30 | tee $OUT/long_conv_hopper_bench.log ;;
    based_bwd) # the Hopper chunked backward, never run: its tests alone and short, then its rows beside the portable
      gpu_tests based_bwd_tests 150 tests/pallas_kernels/test_based_hopper_chunked_bwd.py
      timeout 150 python3 -m benchmarks based --impls hopper hopper+hopper_bwd hopper_parallel --modes fwd_bwd \
        --repeats 10 2>&1 | tail -30 | tee $OUT/based_bwd_bench.log ;;
    persistent) # the persistent Hopper forward (BlockSizes.persistent_ctas), never run: its GPU tests alone and
      # short, then packed documents and the plain causal call against the CTA-per-tile forward
      gpu_tests persistent_tests 240 tests/pallas_kernels/test_attention_hopper.py -k persistent
      timeout 150 python3 -m benchmarks attention --shapes documents B4-S4096-H16-D128-causal --impls hopper \
        hopper+persistent --peers jax.nn:cudnn --repeats 10 2>&1 | grep -vE "^(W|I)[0-9]{4}" | tail -30 \
        | tee $OUT/attention_persistent_bench.log ;;
    profile) # what the missed speed targets' calls are made of: each row's kernels (python -m benchmarks --profile)
      prof() { local name=$1 limit=$2; shift 2; timeout $limit python3 -m benchmarks "$@" --repeats 5 --profile 2>&1 \
                 | grep -vE "^(W|I)[0-9]{4}|^\[" > $OUT/profile_$name.log; tail -12 $OUT/profile_$name.log; }
      prof attention 120 attention --shapes documents --impls hopper --peers jax.nn:cudnn
      prof monarch 90 monarch --shapes headline --impls xla --modes fwd_bwd
      prof long_conv 90 long_conv --shapes B64-D768-L1024 B1-D768-L65536 --impls reference pallas
      prof based 90 based --shapes B8-T2048-H16-F16-D64 B1-T65536-H16-F16-D64 --impls hopper hopper_parallel ;;
    train:*) # training tokens/s, MFU and the kernels of a step: train:MODEL (a preset) on the 360M synthetic config's
      # settings (2048-token rows, bf16, remat dots); TRAIN_SET adds overrides (e.g. batch_size=8 micro_batches=4)
      m=${1#train:}; timeout ${TRAIN_S:-240} python3 -m train --config configs/train/transformer_360m_synthetic.yaml \
        model=$m name=mfu_$m run_dir=/tmp/train/mfu_$m log.progress=plain log.profile_steps=3 ${TRAIN_SET:-} 2>&1 \
        | grep -vE "^(W|I)[0-9]{4}" > $OUT/train_$m.log; grep -E "^(done|step 40)" $OUT/train_$m.log ;;
    point_time) timeout 300 bash benchmarks/scripts/mqar_point_time.sh 2>&1 | tee $OUT/point_time.log ;;
    pick) step point_time; SWEEP_SET=$(echo ${SWEEP_SET:-} $(python3 benchmarks/scripts/mqar_pick.py $OUT/point_time.log))
          echo "SWEEP_SET=$SWEEP_SET" | tee -a $OUT/point_time.log
          mkdir -p ${SWEEP_ROOT:-runs}; echo "$SWEEP_SET" > ${SWEEP_ROOT:-runs}/sweep_set ;;
    gen:*) m=${1#gen:}; for model in ${m//,/ }; do
             # One preallocated pool: a growing one fragments and --batch max's batch then fails to allocate. One
             # process per setting, each with its own time limit (GEN_S, default 200 s): in one process of 290 s the
             # 128-token settings never finished after the 1024+1024 one (2026-12-07, twice).
             for setting in ${GEN_SETTINGS:-1024+1024 128+2048 128+4096}; do
               XLA_PYTHON_CLIENT_PREALLOCATE=true XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout ${GEN_S:-200} \
                 python3 -m jaxlm.generate --config $model --benchmark \
                 --batch max --setting $setting --prefill-chunk 256 --repeats 1 2>&1 \
                 | grep -vE "^(W|I)[0-9]{4}" | tee -a $OUT/gen_$model.log
               echo "[$setting: ${SECONDS}s into the call]" | tee -a $OUT/gen_$model.log
             done
           done ;;
    breakdown:*) m=${1#breakdown:}; timeout 200 python3 benchmarks/scripts/decode_breakdown.py --config ${m%@*} \
                   --batch ${m#*@} --length 1024 2>&1 | grep -vE "^(W|I)[0-9]{4}" | tee $OUT/breakdown_${m%@*}.log ;;
    monarch_speed) for v in monarch dense_mlp; do  # issue 19: tokens/s of GPT-2-medium-Monarch, Monarch vs dense MLPs
                     timeout 200 python3 -m train --config configs/train/gpt2_medium_monarch_synthetic.yaml \
                       model.max_length=2048 name=gpt2_medium_$v run_dir=/tmp/train/gpt2_medium_$v log.progress=plain \
                       $([ $v = dense_mlp ] && echo model.mlp=gelu) 2>&1 | grep -vE "^(W|I)[0-9]{4}" \
                       | tail -8 | tee -a $OUT/monarch_speed.log
                   done ;;
    monarch_text) # issue 19: GPT-2 small on linux-doc (carried as data/linux-doc), dense and Monarch, same tokens
      for v in ${TEXT_VARIANTS:-dense monarch_mlp monarch}; do
        case $v in dense) o="model.mlp=gelu model.mixer_options.attention.projection=dense" ;;
                   monarch_mlp) o="model.mixer_options.attention.projection=dense" ;; *) o="" ;; esac
        timeout ${TEXT_S:-250} python3 -m train --config configs/train/gpt2_small_linux_doc.yaml \
          data.text.path=${TEXT_DATA:-../data/linux-doc} name=$v run_dir=/tmp/text/$v log.progress=plain ${TEXT_SET:-} $o 2>&1 \
          | grep -vE "^(W|I)[0-9]{4}" | grep -E "^(eval|done|compiled|step [0-9]+0/)" > $OUT/text_$v.log
        tail -2 $OUT/text_$v.log
      done
      tar czf $OUT/text_runs.tgz -C /tmp text
      python3 benchmarks/scripts/loss_vs_time.py $(for v in ${TEXT_VARIANTS:-dense monarch_mlp monarch}; do
        echo $v=/tmp/text/$v; done) --out $OUT/gpt2_small_linux_doc.png 2>&1 | tee $OUT/text_table.md ;;
    zoo:*) sweep figure2_zoology ${1#zoo:} ;;
    based:*) sweep figure2_based ${1#based:} ;;
    *) echo "unknown step $1"; exit 2 ;;
  esac
}
for s in "$@"; do
  if [[ $s == *+* ]]; then step "${s%%+*}" & bg=$!; step "${s#*+}"; wait $bg; else step "$s"; fi
done
