#!/usr/bin/env bash
# Installs everything the tests and the main job need on a bare Debian 12 machine.
# Idempotent: packages already present are not reinstalled, and the guest kernel is
# downloaded once into .work/guest/.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential pkg-config cpio kmod iproute2 zstd ca-certificates
  qemu-system-x86 busybox-static passt fio nvme-cli tshark
  qemu-utils libnbd-bin nbdkit gnuplot-nox
  iperf3 curl patch python3 ethtool iputils-ping
  liburing-dev libisal-dev protobuf-compiler
)
missing_packages() {
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}
sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
# Two passes: installing one package can remove another that was already there. Seen on
# a machine image that ships qemu-utils from bookworm-backports: Debian 12's
# qemu-system-x86 conflicts with it, so apt removed it, and qemu-img and qemu-io were
# gone. The second pass installs the Debian 12 qemu-utils that matches.
for pass in 1 2; do
  missing_packages
  ((${#missing[@]})) || break
  echo "install-deps: installing ${missing[*]} (pass $pass)"
  export DEBIAN_FRONTEND=noninteractive
  [ "$pass" -gt 1 ] || "${sudo_cmd[@]}" apt-get update -qq
  # tshark asks whether non-root users may capture; the default answer is fine.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | "${sudo_cmd[@]}" debconf-set-selections
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
done
missing_packages
if ((${#missing[@]})); then
  echo "install-deps: still missing after two passes: ${missing[*]}" >&2
  exit 1
fi
for tool in qemu-img qemu-io qemu-system-x86_64 fio nvme tshark nbdinfo nbdkit iperf3; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool is not on PATH after installing" >&2; exit 1; }
done

# Published crates the workspace builds with a patch of ours (patches/README.md).
scripts/patched-crates.sh

rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# The guest kernel for the kernel-peer tests: a stock Debian cloud kernel, extracted, not installed.
guest=.work/guest
if [ ! -f "$guest/kernel/boot/vmlinuz" ] && ! ls "$guest"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  mkdir -p "$guest/deb"
  (cd "$guest/deb" && apt-get download -qq linux-image-cloud-amd64 >/dev/null &&
    dep=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | tr ',' '\n' | grep -o 'linux-image-[^ ]*cloud-amd64[^ ]*' | head -n1) &&
    apt-get download -qq "$dep" >/dev/null)
  mkdir -p "$guest/kernel"
  for deb in "$guest"/deb/linux-image-[0-9]*.deb; do dpkg -x "$deb" "$guest/kernel"; done
fi
echo "install-deps: ready"
