#!/usr/bin/env bash
# Issue 11's GPU row in one device call: ResNet-18 (CIFAR stem) trained with the CNN recipe (rank projection planned
# for 80%, on the GPU in ranks of multiples of 8), its weights saved, then its latency dense vs compressed at batch 256
# and 1, bf16 and fp16, eager / torch.compile / CUDA graphs (benchmarks/gpu_latency.py). Everything lands in $OUT.
#
#   bash benchmarks/gpu_lease.sh              # on the GPU machine, from the repository root
#   TASK=speed bash benchmarks/gpu_lease.sh   # issue 26's row: ResNet-18 trained for 70% fewer multiply-adds
#                                             # (cnn_recipe.py --grid gpu_speed), timed at its planned cut
#   SMOKE=1 bash benchmarks/gpu_lease.sh      # the same steps on a tiny model, on any machine (checks the script)
#
# The GPU machine has no network: carry the Fashion-MNIST .gz files (/usr/share/datasets/fashion-mnist here) in
# .data/fashion-mnist, and wheels of the packages it lacks or has too old in .whl (for its Python 3.12: datasets, dill,
# multiprocess, transformers, timm, regex at the versions of constraints.txt / this machine's venv); both folders
# are git-ignored; name them in the device tool's `carry`:
#   run(command="bash benchmarks/gpu_lease.sh", carry=[".data", ".whl"], timeout_s=600)
set -euo pipefail

OUT=${OUT:-runs/gpu_lease}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export SMOOTH_HF_FASHION_MNIST_DIR=${SMOOTH_HF_FASHION_MNIST_DIR:-$PWD/.data/fashion-mnist}
[ -d "$SMOOTH_HF_FASHION_MNIST_DIR" ] || SMOOTH_HF_FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
PYTHON=${PYTHON:-python3}
if [ "${SMOKE:-0}" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then  # wheels for the GPU machine's Python
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ "${SMOKE:-0}" = 1 ]; then
    grid="$OUT/smoke_grid.json"
    echo '[{"name": "r18_proj0.8_s0", "model": "resnet14_cifar", "channels": [8, 16, 32], "epochs": 0.3,
            "max_train_samples": 512, "budgets": [0.5], "rank_projection_param_reduction": 0.5,
            "rank_projection_every": 2, "save_weights": true}]' > "$grid"
    latency=(--model resnet14_cifar --channels 8,16,32 --param_budgets 0.5 --mac_budgets 0.5 --batch_sizes 4
             --dtypes fp32 --compile dense,param0.5 --reps 5 --max_eval_samples 200)
    train=(--grid "$grid")
elif [ "${TASK:-}" = speed ]; then
    latency=(--batch_sizes 256 --param_budgets "" --mac_budgets 0.7 --compile dense,macs0.7 --dtypes bf16
             --time_limit 420)
    train=(--grid gpu_speed)
else
    latency=(--batch_sizes 256 --compile dense,param0.7 --time_limit 420)  # the row; compiles take a while
    train=(--grid gpu3 --only r18_proj0.8_s0)
fi
run=r18_proj0.8_s0
[ "${TASK:-}" = speed ] && [ "${SMOKE:-0}" != 1 ] && run=r18_macs0.7_s0

"$PYTHON" benchmarks/cnn_recipe.py "${train[@]}" --out "$OUT/gpu_lease.jsonl" --work_dir /tmp/cnn_recipe \
    2>&1 | tee "$OUT/train.log"
"$PYTHON" benchmarks/gpu_latency.py --weights "$OUT/$run-*.safetensors" "${latency[@]}" \
    --out "$OUT/latency_$run.json" 2>&1 | tee "$OUT/latency.log"
