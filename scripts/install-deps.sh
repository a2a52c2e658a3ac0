#!/usr/bin/env bash
# Installs the Debian packages rmc needs to build, test and run its demo, if any is missing.
# Run as root on Debian 12. The Rust toolchain (cargo, rustc, rustfmt, clippy) must already be
# installed with rustup: Debian's own cargo is too old for this workspace.
set -euo pipefail

packages=(gcc libc6-dev make pkg-config iproute2 procps
    # The RDMA transport links libibverbs and librdmacm; rdma-sys generates its bindings with
    # bindgen, which needs libclang.
    libibverbs-dev librdmacm-dev libclang-dev
    # The Soft-RoCE VM of soft-roce/run-in-vm.sh (the host kernel has no RDMA stack).
    qemu-system-x86 linux-image-amd64 busybox-static
    rdma-core ibverbs-providers ibverbs-utils perftest rdmacm-utils
    # The guest initramfs of guest-linux/build-initramfs.sh (with busybox-static above).
    cpio
    # The arbiter that fences primaries (--arbiter etcd://...): tests start a real etcd.
    etcd-server)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to install packages: ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v vng >/dev/null; then
    echo "install-deps: installing virtme-ng (PyPI) for the Soft-RoCE VM"
    python3 -m pip install -q virtme-ng
    command -v vng >/dev/null || hash -r
fi

for tool in cargo rustc; do
    command -v "$tool" >/dev/null || {
        echo "install-deps: '$tool' not found: install Rust with rustup (https://rustup.rs)" >&2
        exit 1
    }
done
for comp in fmt clippy; do
    cargo "$comp" --version >/dev/null 2>&1 || {
        echo "install-deps: 'cargo $comp' not found: rustup component add ${comp/fmt/rustfmt}" >&2
        exit 1
    }
done
