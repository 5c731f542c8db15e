#!/usr/bin/env bash
# The GPU check (issue #17): run on a machine with an NVIDIA GPU, from a clone with the project installed
# (`pip install -e ".[dev]"`); nothing is downloaded (random full-size weights: speed does not depend on them).
#
#   scripts/gpu-check.sh            # about 5-10 minutes on one GPU
#
# 1. the CUDA parity tests (tests marked `cuda`: each detector's exact fp32 path on CUDA against the CPU, and
#    bf16 autocast keeping the fragile steps in fp32), on test-tiny;
# 2. `inspector bench --device cuda --quick`: every detector at batch 1, 8 and 32 in bf16 at full size
#    (ViT-L/14@336 at 518 px; WinCLIP's ViT-B/16+ at 240 px), images/s, ratio to the backbone floor, peak
#    memory, the fp32 vs bf16 agreement, and the CUDA-vs-CPU parity of the exact path.
# The bench JSON goes to gpu-check.json (or $1), the tables to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-gpu-check.json}

"$PYTHON" - <<'PY'
import torch
if not torch.cuda.is_available():
    raise SystemExit("gpu-check: torch sees no CUDA device (torch %s, CUDA build %s)" % (torch.__version__, torch.version.cuda))
print("gpu-check:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
start=$(date +%s)
"$PYTHON" -m pytest -q -m cuda tests/test_gpu_check.py
"$PYTHON" -m inspector.cli bench --device cuda --precision bf16 --quick --pretrained random --output "$OUT"
echo "gpu-check: done in $(( $(date +%s) - start )) s; report: $OUT"
