#!/usr/bin/env bash
# One-GPU readiness check (docs/benchmarks.md#gpu-check): `maxdeeplab bench gpu`, cut off at
# 8 minutes. The JSON is rewritten after every section, so a run cut short keeps what it measured.
#
# Usage: scripts/gpu_check.sh [OUT_JSON] [more `bench gpu` flags, e.g. --skip-compile]
set -euo pipefail
OUT=${1:-gpu_check.json}
shift || true
exec timeout --signal=INT 480 python -m maxdeeplab.cli bench gpu --json "$OUT" "$@"
