#!/usr/bin/env bash
# ARM smoke test: the portable `onnx` edge engine trains on aarch64, under emulation,
# against a real sft-cloud on this host, and ends with the same edge weights as the x86 run.
#
# Why: plain onnxruntime is what lets the edge run on a Raspberry Pi; this checks the whole
# edge (sft-edge train: tokenizer, engine, AdamW, wire client) on an aarch64 Python with the
# aarch64 wheels from the registry, not just the two graph files.
#
# What it does (root needed: apt, debootstrap, chroot, binfmt_misc):
#   1. apt-get install qemu-user-static debootstrap binfmt-support (if missing);
#   2. mounts binfmt_misc if needed and enables qemu-aarch64 (kernel runs arm64 ELF files
#      through qemu-aarch64-static; flag F, so the chroot needs no copy of qemu);
#   3. builds a minimal arm64 Debian bookworm root in $ARM_ROOT (default .cache/arm64-root,
#      git-ignored; kept between runs) with debootstrap --foreign + --second-stage, copies the
#      host's CA bundle and resolv.conf in;
#   4. builds the splitft wheel on the host (`pip wheel --no-deps .`, as docs/edge-on-arm.md does)
#      and installs it with its `edge` extra into a venv in the root (`pip install --only-binary=:all:
#      'splitft-*.whl[edge]'`: aarch64 wheels from the registry only, no torch, no onnxruntime-training);
#      checks too that the extra resolves to wheels alone for CPython 3.12 on aarch64 (`pip download
#      --platform`), the other Python a 64-bit Pi OS or Ubuntu ships;
#   5. exports a small `--engine onnx` bundle (MiniLM split 2) and a small labelled file with the dev venv
#      (scripts/arm_smoke.py prepare), starts `sft-cloud --port 0` from the dev venv;
#   6. runs `sft-edge train` for $STEPS steps twice, as sessions `x86` (dev venv) and `arm64`
#      (the root's installed `sft-edge`), both against that cloud on localhost (the chroot shares
#      the host's network namespace);
#   7. compares the two loss curves and final edge checkpoints (scripts/arm_smoke.py compare): every
#      step's loss within 1e-5, both AdamW moments of every tensor within 1e-5 of its largest value
#      (attention key biases absolutely), parameters within 2·lr·steps.
#
# Usage: make arm-smoke   or   scripts/arm_smoke.sh [WORK_DIR]   (default .cache/arm-smoke)
# Environment: ARM_ROOT, STEPS (default 4), PYTHON (default .venv/bin/python).
# The bundle's learning rate is 1e-6 (scripts/arm_smoke.py) so that the runs stay comparable over
# several AdamW steps: every step's loss and both moments of every tensor must agree.
# Measured here (2 cores): the root and wheels take 531 s the first time (1,783 s on a loaded machine); then
# a run takes about 5 min (4 emulated steps of 40 s, cores shared with another job).
# /sys stays unmounted: onnxruntime 1.32's cpuinfo segfaults under qemu 7.2 reading the host's x86 topology
# there; without it, it warns that it cannot detect the CPU and runs its generic kernels.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ARM_ROOT="$(realpath -m "${ARM_ROOT:-$REPO/.cache/arm64-root}")"
WORK="$(realpath -m "${1:-$REPO/.cache/arm-smoke}")"
STEPS="${STEPS:-4}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
ARM_VENV=/opt/sft-edge
CLOUD_PID=""

say() { echo "== $*"; }
elapsed() { echo "   ($(( SECONDS - $1 )) s)"; }

unmount_root() {
    # Everything mounted below the root, deepest first (-l: a busy mount goes when its last user does).
    awk -v root="$ARM_ROOT/" 'index($2, root) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
        umount -l "$m"
    done
}

cleanup() {
    if [[ -n "$CLOUD_PID" ]]; then kill "$CLOUD_PID" 2>/dev/null || true; wait "$CLOUD_PID" 2>/dev/null || true; fi
    unmount_root
}
trap cleanup EXIT

host_tools() {
    [[ $EUID -eq 0 ]] || { echo "arm_smoke: needs root (apt-get, debootstrap, chroot, binfmt_misc)" >&2; exit 1; }
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
            || ! command -v update-binfmts >/dev/null; then
        say "installing qemu-user-static debootstrap binfmt-support"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support
    fi
}

binfmt() {
    local dir=/proc/sys/fs/binfmt_misc
    [[ -e $dir/register ]] || mount -t binfmt_misc binfmt_misc "$dir"
    [[ -e $dir/qemu-aarch64 ]] || update-binfmts --import qemu-aarch64
    update-binfmts --enable qemu-aarch64 2>/dev/null || true  # "already enabled" is not an error
    if ! grep -qx enabled "$dir/qemu-aarch64" || ! grep -q '^flags: .*F' "$dir/qemu-aarch64"; then
        echo "arm_smoke: qemu-aarch64 is not registered with flag F in $dir:" >&2
        cat "$dir/qemu-aarch64" >&2
        exit 1
    fi
}

arm_root() {
    if [[ -e $ARM_ROOT/.debootstrap-done ]]; then return; fi
    local t=$SECONDS
    say "debootstrap arm64 $SUITE into $ARM_ROOT (first stage on the host, second stage emulated)"
    unmount_root
    rm -rf "$ARM_ROOT"
    mkdir -p "$ARM_ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3-venv,ca-certificates \
        "$SUITE" "$ARM_ROOT" "$MIRROR"
    chroot "$ARM_ROOT" /debootstrap/debootstrap --second-stage
    unmount_root  # the second stage mounts /proc and /sys itself
    touch "$ARM_ROOT/.debootstrap-done"
    elapsed $t
}

in_root() {
    # Run a command in the arm64 root with /proc and /dev from the host, a clean environment.
    mountpoint -q "$ARM_ROOT/proc" || mount -t proc proc "$ARM_ROOT/proc"
    mountpoint -q "$ARM_ROOT/dev" || mount --bind /dev "$ARM_ROOT/dev"
    chroot "$ARM_ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
        PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 "$@"
}

wheel() {
    # The pure-Python splitft wheel, built on the host, as a user builds it for the board.
    rm -rf "$ARM_ROOT/splitft"
    mkdir -p "$ARM_ROOT/splitft/dist" "$ARM_ROOT/splitft/work/bundle"
    "$PYTHON" -m pip wheel -q --no-deps "$REPO" -w "$ARM_ROOT/splitft/dist"
    WHEEL=$(cd "$ARM_ROOT" && ls splitft/dist/splitft-*.whl)
    WHEEL=/$WHEEL
}

arm_venv() {
    cp /etc/ssl/certs/ca-certificates.crt "$ARM_ROOT/etc/ssl/certs/host-ca.crt"
    cp -L /etc/resolv.conf "$ARM_ROOT/etc/resolv.conf"
    local t=$SECONDS
    say "venv $ARM_VENV in the arm64 root: pip install '${WHEEL##*/}[edge]' (aarch64 wheels only)"
    [[ -x $ARM_ROOT$ARM_VENV/bin/pip ]] || in_root python3 -m venv "$ARM_VENV"
    in_root "$ARM_VENV/bin/pip" install -q --only-binary=:all: "$WHEEL[edge]"
    in_root "$ARM_VENV/bin/pip" install -q --no-deps --force-reinstall "$WHEEL"  # this checkout's code
    for absent in torch transformers onnxruntime-training onnxruntime-training-cpu; do
        if in_root "$ARM_VENV/bin/pip" show -q "$absent" 2>/dev/null; then
            echo "arm_smoke: the edge extra pulled $absent" >&2; exit 1
        fi
    done
    elapsed $t
}

cp312_wheels() {
    # The edge extra must resolve to wheels alone for CPython 3.12 on aarch64 too (Ubuntu 24.04, trixie-era Pi OS).
    say "the edge extra for CPython 3.12 on aarch64: wheels only"
    "$PYTHON" -m pip download -q --only-binary=:all: --implementation cp --python-version 3.12 \
        --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 \
        -d "$WORK/cp312-aarch64" "$ARM_ROOT$WHEEL[edge]"
    (cd "$WORK/cp312-aarch64" && ls -1 ./*.whl | sed 's|^./|   |')
}

copy_work() {
    # The bundle without cloud/ (as a device gets it) and the data.
    cp -r "$WORK/bundle/manifest.json" "$WORK/bundle/edge" "$ARM_ROOT/splitft/work/bundle/"
    cp "$WORK/train.tsv" "$ARM_ROOT/splitft/work/"
}

start_cloud() {
    local log=$WORK/cloud.log
    "$BIN/sft-cloud" --bundle "$WORK/bundle" --port 0 >"$log" 2>&1 &
    CLOUD_PID=$!
    for _ in $(seq 600); do
        URL=$(sed -n 's|^sft-cloud listening on \(ws://[^ ]*\)$|\1|p' "$log")
        if [[ -n "$URL" ]]; then return; fi
        kill -0 "$CLOUD_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    echo "arm_smoke: sft-cloud did not start in 60 s" >&2; cat "$log" >&2; exit 1
}

edge_args() {  # $1: bundle, $2: data dir, $3: session
    echo --bundle "$1/bundle" --cloud "$URL" --session "$3" --data "$2/train.tsv" --format tsv \
        --text-column text --label-column label --batch-size 8 --max-steps "$STEPS" --epochs 1 \
        --checkpoint-every "$STEPS" --checkpoint-dir "$2/edge-$3" --report "$2/report-$3.json" --no-progress \
        --threads 1 --seed 0
}

main() {
    local t0=$SECONDS t
    host_tools
    binfmt
    arm_root
    wheel
    arm_venv
    say "inside the root: $(in_root uname -m), $(in_root "$ARM_VENV/bin/python" -c \
        'import platform, onnxruntime, numpy; print("python", platform.python_version(), platform.machine(),
        "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)')"

    say "MiniLM split-2 onnx bundle and data in $WORK"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    HF_HUB_OFFLINE=1 "$PYTHON" "$REPO/scripts/arm_smoke.py" prepare "$WORK"
    cp312_wheels
    copy_work
    start_cloud
    say "sft-cloud (x86, dev venv) at $URL"

    t=$SECONDS
    say "x86_64 edge: $STEPS steps"
    # shellcheck disable=SC2046
    "$BIN/sft-edge" train $(edge_args "$WORK" "$WORK" x86)
    elapsed $t

    t=$SECONDS
    say "aarch64 edge (emulated): $STEPS steps"
    # shellcheck disable=SC2046
    in_root "$ARM_VENV/bin/sft-edge" train $(edge_args /splitft/work /splitft/work arm64)
    elapsed $t

    say "x86_64 vs aarch64"
    "$PYTHON" "$REPO/scripts/arm_smoke.py" compare "$WORK/edge-x86" "$ARM_ROOT/splitft/work/edge-arm64" \
        --reports "$WORK/report-x86.json" "$ARM_ROOT/splitft/work/report-arm64.json"
    say "arm smoke test passed in $(( SECONDS - t0 )) s"
}

main
