#!/usr/bin/env bash
# A compare suite on a GPU machine without FedML (../shared/device/README.md): each run's clients train on a CPU
# core, its server step (generator, DPO, scoring) runs on the GPU, `workers` runs at a time.
#   here, once:  bash ../shared/device/prepare.sh && python -m benchmarks.device_data .device/data/fashion-mnist-1000
#   there:       bash benchmarks/studies/on_gpu.sh SUITE.yaml [WORKERS 16] [SECONDS 450]   (carry .device)
# Runs go to runs/device/<suite>/ (kept on a warm machine, so a second call resumes the suite) and, packed, to
# $OUT/<suite>.tgz. They are the suite's GPU twin (benchmarks/device_suite.py): other runs than its CPU ones.
set -uo pipefail
suite=$1; workers=${2:-16}; seconds=${3:-450}
source .device/env.sh
[ -e fedml_feddpd/baselines ] || ln -s ../baselines fedml_feddpd/baselines   # a source tree: baselines/ in place
name=$(basename "$suite" .yaml)
out=runs/device/$name
python3 -m benchmarks.device_suite "$suite" --out "$out" --data .device/data/fashion-mnist-1000 > "/tmp/$name.yaml" || exit 2
echo "$(nproc) cores; $(nvidia-smi -L | head -n 1); python $(python3 -c 'import torch; print(torch.__version__)')"
start=$(date +%s)
timeout "$seconds" python3 -m fedml_feddpd compare --cf "/tmp/$name.yaml" --workers "$workers" --no-progress 2>&1 | tail -n 15
echo "$(find "$out" -name metrics.json | wc -l) runs finished; $(( $(date +%s) - start )) s"
if [ -n "${OUT:-}" ]; then (cd "$out" && find . -name metrics.json | tar czf "$OUT/$name.tgz" -T -); fi
