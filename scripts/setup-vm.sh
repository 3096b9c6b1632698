#!/usr/bin/env bash
# Idempotent set-up for testing the cgroup v2 driver on a real v2 kernel under qemu (no KVM):
# qemu, kmod and busybox (virtme's initramfs) from Debian, virtme-ng into the venv, and Debian trixie's 6.12 kernel, fetched
# with apt through a private configuration (the host's sources are left untouched), unpacked
# under var/vm/, its modules copied to /lib/modules/<ver>. Prints the vmlinuz path last.
set -euo pipefail
cd "$(dirname "$0")/.."
VM=${AGENTCG_VM_DIR:-$PWD/var/vm}
PY=${PY:-.venv/bin/python}
mkdir -p "$VM"

need=(qemu-system-x86 kmod busybox-static)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-vm: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$(dirname "$PY")/virtme-run" ]; then
  echo "setup-vm: installing virtme-ng" >&2
  "$PY" -m pip install -q --disable-pip-version-check virtme-ng >&2
fi

vmlinuz=$(ls "$VM"/kernel/boot/vmlinuz-6.12* 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$vmlinuz" ]; then
  apt_dir="$VM/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc/preferences.d"
  # The same Debian mirror the host's apt uses, with the trixie suite.
  mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' \
    | grep -v -e security -e updates | head -n 1)
  if [ -z "$mirror" ]; then
    mirror=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n 1)
  fi
  if [ -z "$mirror" ]; then echo "setup-vm: no Debian mirror in the host's apt sources" >&2; exit 1; fi
  cat > "$apt_dir/etc/trixie.sources" <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$apt_dir/etc"
    -o "Dir::Etc::Preferences=/dev/null"
    -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "Dir::State::status=/dev/null"
    -o "Acquire::Languages=none"
  )
  echo "setup-vm: fetching the trixie package lists" >&2
  apt-get "${apt_opts[@]}" update -qq >&2
  pkg=$(apt-cache "${apt_opts[@]}" pkgnames linux-image-6.12 | grep -E '^linux-image-6\.12\.[0-9]+\+deb13-amd64-unsigned$' | sort -V | tail -n 1)
  if [ -z "$pkg" ]; then echo "setup-vm: no linux-image-6.12*-amd64-unsigned in trixie" >&2; exit 1; fi
  echo "setup-vm: downloading $pkg" >&2
  (cd "$VM" && apt-get "${apt_opts[@]}" download "$pkg" >&2)
  rm -rf "$VM/kernel"
  dpkg -x "$(ls "$VM"/"${pkg}"_*.deb | head -n 1)" "$VM/kernel"
  rm -f "$VM"/linux-image-*.deb
  vmlinuz=$(ls "$VM"/kernel/boot/vmlinuz-6.12* | sort -V | tail -n 1)
fi
ver=${vmlinuz##*/vmlinuz-}
if [ ! -d "/lib/modules/$ver/kernel" ]; then
  mkdir -p "/lib/modules/$ver"
  cp -a "$VM/kernel/usr/lib/modules/$ver/." "/lib/modules/$ver/"
  depmod "$ver" >/dev/null 2>&1 || true
  echo "setup-vm: modules for $ver in /lib/modules/$ver" >&2
fi
# bcc in the VM compiles against /lib/modules/<ver>/build, which virtme points at the unpacked
# package's modules: link the host's Debian headers there, as setup-host.sh does for the host's
# kernel (tracepoint programs read no kernel structs).
kdir="$VM/kernel/usr/lib/modules/$ver"
if [ ! -e "$kdir/build/Makefile" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$hdr" ]; then
    ln -sfn "$hdr" "$kdir/build"
    [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
    echo "setup-vm: linked $kdir/build -> $hdr" >&2
  fi
fi
echo "$vmlinuz"
