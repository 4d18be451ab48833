#!/usr/bin/env bash
# Run elva_jax on the local host (CPU or the local GPUs/TPU chips): all devices form one mesh.
#   bash launch/local.sh [configs/tiny_cpu.yaml] [key=value ...]
set -euo pipefail
cfg="${1:-}"; shift || true
if [ -n "$cfg" ]; then exec python -m elva_jax.train --config "$cfg" "$@"; fi
exec python -m elva_jax.train "$@"
