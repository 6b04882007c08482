#!/usr/bin/env bash
# GPU check, for a machine with a CUDA GPU (run from the repository root):
#   1. FedDIP on Fashion-MNIST / LeNet-5 (experiments/configs/feddip-fmnist-lenet5.toml) with
#      client-gpus = 0.25 (up to 4 client actors share the GPU), and the same run on CPU;
#   2. the cross-device benchmark (experiments/bench_scale.py, MNIST / LeNet-5, 1,000 clients,
#      100 per round) with client-gpus = 0.25, and on CPU beside its plain-loop ideal;
# then prints s/round of each GPU run next to the CPU figure (rounds 2.., round 1 starts Ray).
#
#   experiments/gpu_check.sh [OUT_DIR]          (default OUT_DIR: runs/gpu-check)
#
# Environment: PYTHON (default .venv/bin/python), ROUNDS (default 5), FEDSPARSE_DATA (the datasets;
# see README "Data without internet"). Exits 2 without running anything when no CUDA device is visible.
set -euo pipefail

PYTHON="${PYTHON:-.venv/bin/python}"
ROUNDS="${ROUNDS:-5}"
OUT="${1:-runs/gpu-check}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False); run it on a machine with a CUDA GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PYTHON" -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'

# Mean round_seconds of rounds >= 2 of a run directory.
s_per_round() {
    "$PYTHON" -c 'import sys, pandas as pd; d = pd.read_csv(sys.argv[1] + "/rounds.csv"); print("%.3f" % d.loc[d["round"] >= 2, "round_seconds"].mean())' "$1"
}

echo "== 1/2 FedDIP, Fashion-MNIST / LeNet-5, $ROUNDS rounds: client-gpus=0.25, then CPU"
for device in gpu cpu; do
    gpus=0.25
    [ "$device" = cpu ] && gpus=0
    "$PYTHON" -m fedsparse.cli run experiments/configs/feddip-fmnist-lenet5.toml \
        --set "rounds=$ROUNDS" --set "client-gpus=$gpus" --out "$OUT/feddip-$device" --overwrite --quiet
done

echo "== 2/2 cross-device benchmark (1,000 clients, 100 per round), $ROUNDS rounds: client-gpus=0.25, then CPU"
"$PYTHON" -m experiments.bench_scale --rounds "$ROUNDS" --client-gpus 0.25 --skip-plain --json "$OUT/scale-gpu.json"
"$PYTHON" -m experiments.bench_scale --rounds "$ROUNDS" --json "$OUT/scale-cpu.json"

feddip_gpu="$(s_per_round "$OUT/feddip-gpu")"
feddip_cpu="$(s_per_round "$OUT/feddip-cpu")"
read -r scale_gpu scale_cpu scale_ideal < <("$PYTHON" -c 'import json, sys
g, c = (json.load(open(p)) for p in sys.argv[1:3])
print("%.3f %.3f %.3f" % (g["fedsparse_s_per_round"], c["fedsparse_s_per_round"], c["ideal_s_per_round"]))' "$OUT/scale-gpu.json" "$OUT/scale-cpu.json")

echo
echo "| workload | GPU (client-gpus=0.25) s/round | CPU s/round | CPU ideal s/round |"
echo "|---|---|---|---|"
echo "| FedDIP, Fashion-MNIST / LeNet-5 | $feddip_gpu | $feddip_cpu | |"
echo "| bench_scale 1000x100, MNIST / LeNet-5 | $scale_gpu | $scale_cpu | $scale_ideal |"
echo
echo "results: $OUT/feddip-{gpu,cpu}/rounds.csv, $OUT/scale-{gpu,cpu}.json"
