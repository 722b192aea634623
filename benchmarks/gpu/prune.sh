#!/usr/bin/env bash
# Prune what the benchmarks (ray core + train + data + tune, no dashboard UI) never load.
set -euo pipefail
site=$1
cd "$site"
rm -rf ray/rllib ray/serve ray/llm ray/jars ray/dashboard/client \
  ray/tune/examples ray/train/examples ray/data/examples ray/util/dask/tests \
  ray/*.data ./*.data
find . -depth -type d \( -name tests -o -name __pycache__ \) -path './ray/*' -exec rm -rf {} +
find . -depth -type d -name __pycache__ -exec rm -rf {} +
find . -name '*.pyc' -delete
# ray's RECORD lists the pruned files; nothing reads it at run time
du -sh .
