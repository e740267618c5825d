#!/usr/bin/env bash
# Installs what building and testing nbd-s3 needs on Debian 12, skipping what is present.
# The ONE list of dependencies: scripts/test, .ci/run and the README all use this script.
#   scripts/deps.sh            build + test dependencies
#   scripts/deps.sh --build    only what building needs (C toolchain, Rust)
#   scripts/deps.sh --bench    also the benchmark peers (nbdkit S3 plugin, s3backer)
#   scripts/deps.sh --ci       also packaging tools (lintian, dpkg-dev, rpm)
# Tests also get a guest for the kernel NBD client (see "Kernel client guest" below).
set -euo pipefail

# Build: a C toolchain for aws-lc-sys; tests: the real NBD clients, nbdkit, filesystems.
BUILD_PACKAGES="build-essential pkg-config curl ca-certificates git"
TEST_PACKAGES="libnbd-bin python3-libnbd qemu-utils fio nbd-client nbdkit e2fsprogs fuse3 \
util-linux mount procps systemd"
BENCH_PACKAGES="nbdkit-plugin-python python3-boto3 s3backer"
CI_PACKAGES="lintian dpkg-dev rpm"
# The kernel-client tests boot a Debian kernel under qemu; the guest runs the host's own tools.
GUEST_PACKAGES="qemu-system-x86 busybox-static kmod xfsprogs iproute2"
GUEST_DIR=${NBD_S3_GUEST_DIR:-$HOME/.cache/nbd-s3/guest}
S3S_FS_VERSION=0.14.1
RUST_MIN=1.80

want="$BUILD_PACKAGES $TEST_PACKAGES"
build_only=
for arg in "$@"; do
  case $arg in
    --build) want="$BUILD_PACKAGES"; build_only=1 ;;
    --bench) want="$want $BENCH_PACKAGES" ;;
    --ci) want="$want $CI_PACKAGES" ;;
    *) echo "usage: $0 [--build] [--bench] [--ci]" >&2; exit 2 ;;
  esac
done

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "deps.sh: need root (or sudo) to run: $*" >&2; exit 1
  fi
}

missing=()
for p in $want; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps.sh: installing ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
fi

# Rust: Debian's rustc is too old for the AWS SDK; use rustup's stable toolchain.
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! command -v cargo >/dev/null; then
  echo "deps.sh: installing Rust (rustup, stable) into ~/.cargo"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --profile minimal --component rustfmt,clippy
  . "$HOME/.cargo/env"
fi
have=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$RUST_MIN" "$have" | sort -V | head -n1)" != "$RUST_MIN" ]; then
  echo "deps.sh: rustc $have is older than $RUST_MIN; run: rustup update stable" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

[ -n "$build_only" ] && { echo "deps.sh: build dependencies present"; exit 0; }

# The S3 server the integration tests and benchmarks run against.
s3s=${S3S_FS:-$HOME/.cargo/bin/s3s-fs}
if ! [ -x "$s3s" ] && ! command -v s3s-fs >/dev/null; then
  echo "deps.sh: installing s3s-fs $S3S_FS_VERSION"
  cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked
fi
# Kernel client guest (tests/it/kernel.rs). This machine has no nbd module, a guest kernel
# does: Debian 12's kernel booted by qemu (TCG, no KVM needed) with a busybox initramfs, the
# host's root shared read-only so the guest runs the host's nbd-client, mkfs and fio.
missing=()
for p in $GUEST_PACKAGES; do
  if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
    missing+=("$p")
  fi
done
# qemu-system-x86 and qemu-utils must come from one qemu release: Debian 12's qemu-system-x86
# removes a newer (backported) qemu-utils, whose qemu-io and qemu-storage-daemon the tests use.
qemu_ver() { apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}'; }
if [ ${#missing[@]} -gt 0 ] ||
  [ "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" != "$(qemu_ver)" ]; then
  as_root apt-get update -q
  qemu_ver=$(qemu_ver)
  echo "deps.sh: installing ${missing[*]} qemu-utils=$qemu_ver (kernel client guest)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    --allow-downgrades "${missing[@]}" "qemu-utils=$qemu_ver"
fi
if ! ls "$GUEST_DIR"/boot/vmlinuz-* "$GUEST_DIR"/lib/modules/*/modules.dep >/dev/null 2>&1; then
  image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  echo "deps.sh: unpacking $image into $GUEST_DIR (guest kernel and modules)"
  dl=$(mktemp -d)
  (cd "$dl" && apt-get download -q "$image")
  mkdir -p "$GUEST_DIR"
  dpkg-deb -x "$dl"/"$image"_*.deb "$GUEST_DIR"
  rm -rf "$dl"
  kver=${image#linux-image-}
  /usr/sbin/depmod -b "$GUEST_DIR" "$kver"
fi
echo "deps.sh: all dependencies present"
