#!/usr/bin/env bash
# The GPU checks of the project in stages that each fit a 10-minute command, logging to one
# folder: what a session with an H100/H200 runs before it writes benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_session.sh STAGE [OUT_DIR]      (OUT_DIR default: gpu_logs/)
#
# Stages (in the order to run them; each writes OUT_DIR/<stage>.log, JSON where the script has it):
#   env        device, driver, torch / triton / python versions, free GPU memory
#   parity     the kernel parity suite at real ViT shapes in bf16/fp16 + the model-level
#              fused-vs-reference tests, on the GPU (same files CI runs under the interpreter)
#   kernels    bench_kernels.py: ViT-S/B/L, B 8/32/64, masks 0.75/0.9, every op
#   step       bench_step.py: ViT-B at B 16/32/48, eager vs fused vs compile (+ graphs), MFU,
#              then the largest batch per GPU for B and L
#   videomae   bench_videomae.py against the official code (needs VIDEOMAE_REPO=<checkout>)
#   loader     bench_loader.py on the GPU host (PyAV must be importable: carry its wheel)
#   smoke      the CLIs on CUDA: the pre-training demo (prefetch thread on a side stream,
#              fused kernels, bf16), fine-tuning from it, then evaluation
#   profile    python -m mam2_fast.profile on the ViT-B config (phase split + trace)
# Nothing here needs the network. Every stage runs with PYTHONUNBUFFERED=1 and keeps going
# after a failing command, so the log shows all of it; the exit status is the first failure.
set -u
stage="${1:?usage: gpu_session.sh env|parity|kernels|step|videomae|loader|smoke|profile [OUT_DIR]}"
out="${2:-gpu_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python}"
status=0

run() {  # run CMD..., append to the stage log, remember the first failure
    echo "\$ $*" | tee -a "$out/$stage.log"
    "$@" 2>&1 | tee -a "$out/$stage.log"
    local rc=${PIPESTATUS[0]}
    echo "[exit $rc]" | tee -a "$out/$stage.log"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

case "$stage" in
env)
    run nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm --format=csv
    run "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    ;;
parity)
    run "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_varlen.py \
        tests/test_kernels_gather.py tests/test_kernels_rgb_diff.py tests/test_kernels_linear_ce.py
    run "$py" -m pytest -q -p no:cacheprovider tests/test_model_fused.py tests/test_model_targets_fused.py tests/test_engine.py \
        tests/test_engine_loop.py tests/test_data_loader.py
    ;;
kernels)
    run "$py" benchmarks/bench_kernels.py --models S,B,L --batch 8,32,64 --masks 0.75,0.9
    ;;
step)
    run "$py" benchmarks/bench_step.py --models B --batch 16,32,48 --out "$out/step_b.json"
    run "$py" benchmarks/bench_step.py --models B --batch 32 --variants fused --max-batch B,L --out "$out/max_batch.json"
    ;;
videomae)
    repo="${VIDEOMAE_REPO:?set VIDEOMAE_REPO to a checkout of MCG-NJU/VideoMAE}"
    run "$py" benchmarks/bench_videomae.py --videomae-repo "$repo" --batch 32,64 --out "$out/videomae.json"
    ;;
loader)
    run "$py" benchmarks/bench_loader.py --device cuda --workers 4,8,12,16 --batches 20
    ;;
smoke)
    run "$py" -m mam2_fast.pretrain train.device=cuda train.precision=auto train.max_steps=60 \
        --output-dir "$out/smoke_pretrain"
    run "$py" -m mam2_fast.finetune train.device=cuda train.precision=auto --init "$out/smoke_pretrain" \
        --max-steps 40 --output-dir "$out/smoke_finetune"
    run "$py" -m mam2_fast.evaluate "$out/smoke_finetune"
    ;;
profile)
    run "$py" -m mam2_fast.profile --config configs/k400_vit_b.yaml --steps 20 model.kernels=fused \
        --output-dir "$out/profile_b"
    ;;
*)
    echo "unknown stage '$stage' (env | parity | kernels | step | videomae | loader | smoke | profile)" >&2
    exit 2
    ;;
esac
exit "$status"
