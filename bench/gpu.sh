#!/usr/bin/env bash
# The train-step benchmark in bf16 on a lent accelerator (the `device` tool), one prepared
# run: installs the package, checks the device, then times shapes S and M on each span mix
# it can build (with the compact head and with the head at every position, then with the
# reference attention instead of flash) and reports MFU
# against the bf16 matmul peak measured in the same worker. Results go to $OUT (or ./out).
#   bash bench/gpu.sh          (on the device machine, from the repository root)
set -euo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q -e . "jax[cuda12]" 2>&1 | tail -2
python3 -c "import jax; print(jax.devices())" | tee "$OUT/devices.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/devices.txt" || true
# the demo's real span mix needs Java (TextWorld-Express); FireAct's needs ../shared
MIX=synthetic
if tools/ensure-java >/dev/null 2>&1; then MIX=synthetic,demo; fi
if [ -d ../shared/data/fireact ]; then MIX=$MIX,fireact; fi
python3 bench/train_step.py --shapes S,M --mix "$MIX" --full-head --repeats 3 --steps 10 \
  --dtype bfloat16 --json "$OUT/train_step_bf16.json" 2>&1 | tee "$OUT/train_step_bf16.txt"
# the same with the attention that keeps the [T, S] probabilities (the trainer's default is
# flash): which kernel a GPU run should use
python3 bench/train_step.py --shapes S,M --mix "$MIX" --repeats 3 --steps 10 \
  --dtype bfloat16 --attention reference --json "$OUT/train_step_bf16_reference.json" 2>&1 \
  | tee "$OUT/train_step_bf16_reference.txt"
