#!/usr/bin/env bash
# Unpacks libreswan (pluto, whack) and the NSS tools it needs into a private
# directory, without installing it: the Debian package conflicts with
# strongSwan, which the other end-to-end tests need installed. Idempotent: a
# finished unpack is left alone. Needs apt sources (run as root; it runs
# apt-get update only when a download fails).
#
# Usage: test/lswan/install.sh [DIR]   (default: $IKELB_LIBRESWAN_ROOT or
# /var/cache/ikelb-libreswan). The tests look in the same place.
set -euo pipefail
dir="${1:-${IKELB_LIBRESWAN_ROOT:-/var/cache/ikelb-libreswan}}"
root="$dir/root"
libs="$root/usr/lib/x86_64-linux-gnu"
bins=("$root/usr/libexec/ipsec/pluto" "$root/usr/libexec/ipsec/whack" "$root/usr/bin/certutil" "$root/usr/bin/pk12util")

ok() {
  local b
  [[ -f "$dir/.complete" ]] || return 1
  for b in "${bins[@]}"; do
    [[ -x "$b" ]] || return 1
    if LD_LIBRARY_PATH="$libs" ldd "$b" | grep -q 'not found'; then return 1; fi
  done
}
if ok; then
  echo "libreswan already unpacked in $root"
  exit 0
fi

# libreswan, the NSS tools, and those of their library dependencies that are
# not installed on this machine (installed ones are used as they are). openssl
# makes the PKCS#12 file certutil/pk12util import the responder's key from.
want=(libreswan libnss3-tools)
for pkg in $(apt-cache depends libreswan libnss3-tools 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^lib/ && $2 != "libnss3-tools" {print $2}' | sort -u); do
  if [[ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != installed ]]; then
    want+=("$pkg")
  fi
done
command -v openssl >/dev/null || want+=(openssl)

rm -rf "$dir"
mkdir -p "$dir/debs" "$root"
cd "$dir/debs"
if ! apt-get download "${want[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get download "${want[@]}" >/dev/null
fi
for deb in ./*.deb; do
  dpkg-deb -x "$deb" "$root"
done
for b in "${bins[@]}"; do
  if LD_LIBRARY_PATH="$libs" ldd "$b" | grep 'not found'; then
    echo "install.sh: $b: libraries missing after unpacking ${want[*]}" >&2
    exit 1
  fi
done
touch "$dir/.complete"
echo "libreswan unpacked in $root (${want[*]})"
