#!/usr/bin/env bash
# Packs into .device/ (git-ignored) what a benchmark run on a lent GPU machine needs beside the working tree.
# That machine reaches no network; its python3 (3.12) has torch with CUDA and most of what we use, but not:
#   deepspeed and its pydantic/hjson, webdataset, submitit, torch-fidelity, omegaconf, guided-diffusion-sdk.
# Their wheels are fetched here at the versions this project's .venv has (built here when PyPI has only a
# source archive: all of those are pure Python), pydantic-core for CPython $DEVICE_PYTHON.
# The FID Inception file (87 MB) does not fit the 64 MiB transfer: it travels with its weights rounded to fp16
# (42 MiB) and bench/device_run.sh turns it back into a float32 TorchScript file. Same graph, same speed, so it
# serves timings and GPU-against-CPU agreement; its features differ from the real network's in the 4th digit,
# so it never serves published numbers.
#
#   bash scripts/device_pack.sh            # then run `bash bench/device_run.sh $OUT ...` there, carrying .device
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
PY=.venv/bin/python
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
NEEDED=(deepspeed hjson pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand submitit
        torch-fidelity omegaconf guided-diffusion-sdk typing-extensions)  # (pydantic 2.14 needs typing-extensions >= 4.16)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do PLATFORMS+=(--platform "${p}_x86_64"); done

tmp=.device.tmp
rm -rf "$tmp" && mkdir -p "$tmp/wheels"
for name in "${NEEDED[@]}"; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$version" ] || { echo "device_pack: $name is not installed in .venv (run scripts/setup.sh)" >&2; exit 1; }
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
       "${PLATFORMS[@]}" -d "$tmp/wheels" "$name==$version" >/dev/null 2>&1; then
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/wheels" "$name==$version" >/dev/null
  fi
done
# a wheel built here must be pure Python: a compiled one would be for this machine's CPython, not the device's
for w in "$tmp"/wheels/*.whl; do
  case "$w" in
    *-none-any.whl|*-cp${DEVICE_PYTHON/./}-*.whl) ;;
    *) echo "device_pack: $w is compiled for another Python than $DEVICE_PYTHON" >&2; exit 1 ;;
  esac
done
"$PY" - "$tmp/inception-fp16.pt" <<'EOF'
import sys
import warnings

import torch

from eval.inception import weights_path

warnings.simplefilter("ignore", FutureWarning)
net = torch.jit.load(str(weights_path()), map_location="cpu")
torch.jit.save(net.half(), sys.argv[1])
EOF
size=$(du -sm "$tmp" | cut -f1)
if [ "$size" -gt 58 ]; then echo "device_pack: $size MiB, over what a call can carry beside the tree" >&2; exit 1; fi
rm -rf .device && mv "$tmp" .device
echo "device_pack: .device/ ($size MiB): $(ls .device/wheels | wc -l) wheels and the fp16 Inception file"
