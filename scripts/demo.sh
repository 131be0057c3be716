#!/usr/bin/env bash
# Sets everything up, then runs the demo on this machine. Extra arguments go to `adm demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/adm demo "$@"
