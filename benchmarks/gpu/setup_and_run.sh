#!/usr/bin/env bash
# On the GPU machine (copied to .devbundle/ with the bundle): unpack the bundle(s) into .devbundle/site (once per warm machine),
# put it and the repo root on PYTHONPATH, check the imports, then run "$@".
#   bash .devbundle/setup_and_run.sh python benchmarks/train.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD/.devbundle
site=$here/site
shopt -s nullglob
archives=("$here"/bundle*.tar.xz)
shopt -u nullglob
# one stamp per archive (name + size), so a second call with another archive still unpacks it
for a in "${archives[@]}"; do
  stamp=$site/.unpacked.$(basename "$a").$(stat -c %s "$a")
  if [ ! -e "$stamp" ]; then
    echo "unpacking $(basename "$a") ($(stat -c %s "$a") bytes)"
    mkdir -p "$here"
    tar -C "$here" -xJf "$a"
    touch "$stamp"
  fi
done
[ -d "$site/ray" ] || { echo "no ray in $site: carry .devbundle/bundle*.tar.xz" >&2; exit 3; }

export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=disabled NO_ALBUMENTATIONS_UPDATE=1 RAY_AUTH_MODE=disabled
export RAY_USAGE_STATS_ENABLED=0 RAY_DISABLE_DOCKER_CPU_WARNING=1 PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI

python3 -c "import sys, ray, open_clip, open_clip_train, webdataset, pydantic, torch; print('python', sys.version.split()[0], 'ray', ray.__version__, 'open_clip', open_clip.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi -L || true
[ $# -gt 0 ] || exit 0
[ "$1" = python ] && { shift; set -- python3 "$@"; }  # the device has python3 (its torch venv)
exec "$@"
