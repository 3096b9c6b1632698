#!/usr/bin/env bash
# Idempotent host set-up for the node agent's kernel side (needs root):
# bcc from Debian, kernel headers linked for the running kernel, tracefs mounted; and Debian's
# gRPC C++ toolchain for the native load generator (clients/loadgen, `make loadgen`); openssl,
# with which the TLS tests make their certificates (tests/pki.py); systemd, whose
# systemd-analyze checks the README's unit files (it does not have to run as init).
# Optional: WITH_POSTGRES=1 also installs Debian's PostgreSQL server.
set -euo pipefail

need=(bpfcc-tools python3-bpfcc linux-headers-amd64)
need+=(g++ make pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc)
need+=(openssl systemd)
if [ "${WITH_POSTGRES:-0}" = 1 ]; then need+=(postgresql); fi

missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "setup-host: need root to install ${missing[*]}" >&2; exit 1; fi
  echo "setup-host: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# bcc compiles against /lib/modules/$(uname -r)/build; link the newest Debian headers when the
# running kernel ships none (tracepoint programs do not depend on kernel struct layouts).
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/Makefile" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ]; then echo "setup-host: no kernel headers under /usr/src" >&2; exit 1; fi
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
  echo "setup-host: linked $kdir/build -> $hdr"
fi

if [ -z "$(ls -A /sys/kernel/tracing 2>/dev/null)" ]; then
  mount -t tracefs tracefs /sys/kernel/tracing
  echo "setup-host: mounted tracefs"
fi
