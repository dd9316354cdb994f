#!/usr/bin/env bash
# Build onnxruntime-training 1.19.2 (CPU, on-device training APIs) as a Python wheel for linux-aarch64.
#
# Why: the `ort-training` edge engine needs onnxruntime's training API, whose last release
# (1.19.2) ships wheels for x86_64 only. The portable `onnx` engine needs none of this (plain
# onnxruntime has aarch64 wheels); build this only to run `--engine ort-training` bundles on ARM.
#
# Where: ON the board (64-bit Raspberry Pi OS bookworm / Debian 12 arm64, Python 3.11; 4 GB RAM
# or more plus swap: the compile takes hours on a Pi 4/5) or in an arm64 container on a bigger
# machine, e.g.  docker run --rm -it --platform linux/arm64 -v "$PWD:/out" python:3.11-bookworm
# It needs the network: git clone, and CMake's FetchContent downloads onnxruntime's pinned
# dependencies (abseil, protobuf, onnx, eigen, ...) during the configure step.
#
# NOT RUN in this repository's CI or by its authors end to end: the machine it was written on
# has no network access (its syntax is checked with `bash -n`). The flags follow onnxruntime's
# "Build for on-device training" documentation.
#
# Usage:  scripts/build-ort-training-aarch64.sh [WORK_DIR]     (default ./ort-build)
#         JOBS=2 scripts/build-ort-training-aarch64.sh          (parallel compile jobs; default 2:
#                                                                each job can take 1.5 GB of RAM)
# Output: WORK_DIR/dist/onnxruntime_training-1.19.2*-linux_aarch64.whl and WORK_DIR/dist/BUILD-INFO.txt
# Install next to splitft (both wheels provide the `onnxruntime` module, so not plain onnxruntime too):
#         pip install WORK_DIR/dist/onnxruntime_training-*.whl
#         pip install --no-deps /path/to/splitft && pip install tokenizers websockets safetensors tqdm
set -euo pipefail

ORT_TAG="v1.19.2"
ORT_REPO="https://github.com/microsoft/onnxruntime.git"
CMAKE_PIN="cmake==3.28.4"            # onnxruntime 1.19 needs CMake >= 3.26 (Debian 12 ships 3.25); < 4 for its deps
PY_BUILD_DEPS=("numpy==2.0.2" "packaging==24.1" "wheel==0.44.0" "setuptools==72.2.0" "$CMAKE_PIN")
WORK_DIR="$(realpath -m "${1:-ort-build}")"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"

if [[ "$(uname -m)" != "aarch64" ]]; then
    echo "error: this builds for linux-aarch64 and must run on it (uname -m is $(uname -m))" >&2
    exit 1
fi

echo "== system packages (Debian/Raspberry Pi OS)"
if command -v apt-get >/dev/null; then
    SUDO=""; [[ "$(id -u)" -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends build-essential git patch ca-certificates \
        python3-dev python3-venv
fi

echo "== build environment: $WORK_DIR/venv ($("$PYTHON" --version))"
mkdir -p "$WORK_DIR"
"$PYTHON" -m venv "$WORK_DIR/venv"
# shellcheck disable=SC1091
source "$WORK_DIR/venv/bin/activate"
python -m pip install --upgrade pip
python -m pip install "${PY_BUILD_DEPS[@]}"

echo "== source: onnxruntime $ORT_TAG"
SRC="$WORK_DIR/onnxruntime"
if [[ ! -d "$SRC/.git" ]]; then
    git clone --depth 1 --branch "$ORT_TAG" --recursive "$ORT_REPO" "$SRC"
fi
git -C "$SRC" describe --tags --exact-match | grep -qx "$ORT_TAG" \
    || { echo "error: $SRC is not checked out at $ORT_TAG" >&2; exit 1; }

echo "== build (Release, CPU, training APIs, Python wheel; $JOBS jobs)"
cd "$SRC"
./build.sh \
    --config Release \
    --build_dir "$WORK_DIR/build" \
    --enable_training_apis \
    --build_wheel \
    --parallel "$JOBS" \
    --skip_tests \
    --compile_no_warning_as_error \
    --allow_running_as_root \
    --cmake_extra_defines onnxruntime_BUILD_UNIT_TESTS=OFF

echo "== wheel"
mkdir -p "$WORK_DIR/dist"
WHEEL="$(ls "$WORK_DIR"/build/Release/dist/onnxruntime*.whl | head -n 1)"
cp "$WHEEL" "$WORK_DIR/dist/"
WHEEL="$WORK_DIR/dist/$(basename "$WHEEL")"
# The edge engine imports onnxruntime.training.api (Module, Optimizer, CheckpointState): check it is packaged.
if ! python -m zipfile -l "$WHEEL" | grep -q "onnxruntime/training/api/module.py"; then
    echo "error: $WHEEL lacks onnxruntime/training/api: the training APIs were not packaged" >&2
    exit 1
fi
{
    echo "onnxruntime $ORT_TAG ($(git -C "$SRC" rev-parse HEAD))"
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) on $(uname -srm), $(python --version), $(cmake --version | head -n 1)"
    echo "flags: --config Release --enable_training_apis --build_wheel --skip_tests --compile_no_warning_as_error"
    echo "sha256 $(sha256sum "$WHEEL")"
} > "$WORK_DIR/dist/BUILD-INFO.txt"
cat "$WORK_DIR/dist/BUILD-INFO.txt"

echo "== smoke test: the training API imports without torch"
python -m pip install "$WHEEL"
python -c "
import importlib, sys, types, pathlib
import onnxruntime as ort
training = types.ModuleType('onnxruntime.training')
training.__path__ = [str(pathlib.Path(ort.__file__).parent / 'training')]
sys.modules['onnxruntime.training'] = training
api = importlib.import_module('onnxruntime.training.api')
assert 'torch' not in sys.modules
print('onnxruntime', ort.__version__, 'training API:', api.Module.__name__, api.Optimizer.__name__, api.CheckpointState.__name__)
"
echo "done: $WHEEL"
