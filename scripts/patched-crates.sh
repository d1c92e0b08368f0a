#!/usr/bin/env bash
# Materialises the published crates the workspace patches (patches/README.md): download
# from crates.io, check the SHA-256, unpack under .work/patched-crates/, apply our
# patch. Idempotent: a crate is redone only when its patch changed.
set -euo pipefail
cd "$(dirname "$0")/.."

# name version sha256-of-the-.crate patch-file
crates=(
  "vhost 0.18.0 65ecafe06ea725636dad0b617c5258e079c061d0d38fd9966af93e0ecd9d07e7 patches/vhost-0.18.0-backend-config-change.patch"
)

# Straight from crates.io's download host; where that is not reachable but cargo's
# configured registry is (a mirror, a proxy), through cargo itself: an empty package
# depending on exactly that version, fetched into cargo's cache.
fetch_crate() {
  local name=$1 version=$2 dest=$3
  if [ -z "${PATCHED_CRATES_VIA_CARGO:-}" ] &&
    curl -sSfL --retry 3 -o "$dest.part" "https://static.crates.io/crates/$name/$name-$version.crate"; then
    mv "$dest.part" "$dest"
    return
  fi
  rm -f "$dest.part"
  echo "patched-crates: fetching $name $version through cargo"
  local tmp
  tmp=$(mktemp -d)
  mkdir -p "$tmp/src"
  printf '[package]\nname = "fetch-%s"\nversion = "0.0.0"\nedition = "2021"\n\n[dependencies]\n%s = "=%s"\n' \
    "$name" "$name" "$version" >"$tmp/Cargo.toml"
  : >"$tmp/src/lib.rs"
  (cd "$tmp" && cargo fetch -q)
  local cached
  cached=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate" | head -n1)
  cp "$cached" "$dest"
  rm -rf "$tmp"
}

out=.work/patched-crates
mkdir -p "$out"
for entry in "${crates[@]}"; do
  read -r name version sum patch <<<"$entry"
  dir="$out/$name-$version"
  stamp=$(sha256sum "$patch" | cut -d' ' -f1)
  if [ -f "$dir/.patched" ] && [ "$(cat "$dir/.patched")" = "$stamp" ]; then
    continue
  fi
  crate="$out/$name-$version.crate"
  if [ ! -f "$crate" ] || ! echo "$sum  $crate" | sha256sum -c --quiet - 2>/dev/null; then
    fetch_crate "$name" "$version" "$crate"
  fi
  echo "$sum  $crate" | sha256sum -c --quiet - || {
    echo "patched-crates: $crate does not have the published checksum $sum" >&2
    exit 1
  }
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  tar -xzf "$crate" -C "$dir.tmp"
  (cd "$dir.tmp/$name-$version" && patch -p1 --quiet --forward <"$OLDPWD/$patch")
  mv "$dir.tmp/$name-$version" "$dir"
  rmdir "$dir.tmp"
  echo "$stamp" >"$dir/.patched"
  echo "patched-crates: $name $version unpacked and patched in $dir"
done
