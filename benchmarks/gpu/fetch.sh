#!/usr/bin/env bash
# Download the cp312 wheels of wheels.txt (what a bare GPU machine with torch lacks) into WHEELDIR.
#   benchmarks/gpu/fetch.sh WHEELDIR && benchmarks/gpu/build.sh WHEELDIR /tmp/stage .devbundle/bundle.tar.xz
# Then, on the GPU machine, from the repo root with .devbundle/ copied beside it:
#   bash .devbundle/setup_and_run.sh python benchmarks/train.py --model ViT-B-32 --batch 256 \
#       --image-size 224 --steps 100 --warmup-steps 20 --peak-tflops 989 --json train.json
set -euo pipefail
out=$1
mkdir -p "$out"
while read -r pinned; do
  name=${pinned%-*} version=${pinned##*-}
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$out" "$name==$version"
done < "$(dirname "$0")/wheels.txt"
ls "$out"
