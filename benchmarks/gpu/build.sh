#!/usr/bin/env bash
# Build the device bundle: unpack the wheels of WHEELDIR into STAGE/site, prune ray, pack.
#   build.sh WHEELDIR STAGE [OUT.tar.xz]   (no OUT: unpack and prune only)
set -euo pipefail
wheels=$1 stage=$2 out=${3:-}
rm -rf "$stage" && mkdir -p "$stage/site"
for w in "$wheels"/*.whl; do unzip -q -o "$w" -d "$stage/site"; done
bash "$(dirname "$0")/prune.sh" "$stage/site"
if [ -n "$out" ]; then
  rm -f "$out"
  (cd "$stage" && tar --owner=0 --group=0 --numeric-owner --sort=name -cf - site) | nice -n 19 xz -9e -T1 >"$out"
  ls -l "$out"
fi
