#!/usr/bin/env bash
# Build the deeplab2 reference environment used by the parity tests and `bench model --against deeplab2`.
#
# It is an optional extra, never a runtime dependency of maxdeeplab: a separate virtual environment with
# TensorFlow 2.21 CPU and google-research/deeplab2 (HEAD 64bc1c1 is known to work unmodified).
#
# Usage: scripts/deeplab2_env.sh DEEPLAB2_SRC [ENV_DIR]
#   DEEPLAB2_SRC  a deeplab2 checkout (a work tree with deeplab2's files at its top, e.g. model/, *.proto)
#                 or a bare/mirror git directory of it (exported with `git archive HEAD`, minus data/testdata,
#                 which the snapshot lacks a file of).
#   ENV_DIR       where to build (default /work/deeplab2-env). Afterwards:
#                   export DEEPLAB2_ENV=ENV_DIR
#                 ENV_DIR/venv is the virtual environment, ENV_DIR/src holds the package `deeplab2`
#                 (put ENV_DIR/src on PYTHONPATH) and ENV_DIR/activate.sh sets everything up.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 DEEPLAB2_SRC [ENV_DIR]" >&2
  exit 2
fi
SRC=$(cd "$1" && pwd)
ENV_DIR=${2:-/work/deeplab2-env}
PYTHON=${PYTHON:-python3}

mkdir -p "$ENV_DIR/src/deeplab2"
# The source: a git directory is exported at HEAD; a work tree is copied. deeplab2's imports are
# `from deeplab2.model import ...`, so the files go under src/deeplab2/.
# (git may still print "invalid object ... data/testdata/..." for the excluded file; it exits 0.)
if git --git-dir="$SRC" rev-parse --is-bare-repository >/dev/null 2>&1 && [[ ! -d "$SRC/model" ]]; then
  git --git-dir="$SRC" archive --format=tar HEAD -- . ':(exclude)data/testdata' \
    | tar -x -C "$ENV_DIR/src/deeplab2"
elif [[ -d "$SRC/model" ]]; then
  (cd "$SRC" && tar -c --exclude='./data/testdata' --exclude='./.git' .) | tar -x -C "$ENV_DIR/src/deeplab2"
else
  echo "error: $SRC is neither a deeplab2 work tree (no model/) nor a git directory" >&2
  exit 2
fi

if [[ ! -x "$ENV_DIR/venv/bin/python" ]]; then
  "$PYTHON" -m venv "$ENV_DIR/venv"
fi
PIP="$ENV_DIR/venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
$PIP install --quiet 'tensorflow-cpu==2.21.*' 'tf-keras==2.21.*' numpy scipy grpcio-tools pillow \
  absl-py immutabledict pyyaml
# Only `orbit` is needed (deeplab2's trainer imports it); the rest of tf-models-official's dependencies
# would drag in a second TensorFlow.
$PIP install --quiet --no-deps 'tf-models-official==2.20.0'

(cd "$ENV_DIR/src" && "$ENV_DIR/venv/bin/python" -m grpc_tools.protoc -I. deeplab2/*.proto --python_out=.)

cat > "$ENV_DIR/activate.sh" <<ACT
# Source this file to use the deeplab2 reference environment.
export PYTHONPATH="$ENV_DIR/src\${PYTHONPATH:+:\$PYTHONPATH}"
# Keras 3 fails on deeplab2's SyncBatchNormalization; tf-keras (Keras 2) works.
export TF_USE_LEGACY_KERAS=1
export TF_CPP_MIN_LOG_LEVEL=2
source "$ENV_DIR/venv/bin/activate"
ACT

TF_USE_LEGACY_KERAS=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$ENV_DIR/src" "$ENV_DIR/venv/bin/python" -c \
  'import tensorflow as tf, orbit; from deeplab2.model import deeplab; print("deeplab2 env ok, tensorflow", tf.__version__)'
echo "export DEEPLAB2_ENV=$ENV_DIR"
