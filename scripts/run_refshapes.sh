#!/usr/bin/env bash
# The README's main command: install, then build RefShapes, train, evaluate (CPU is fine).
#   bash scripts/run_refshapes.sh [WORKDIR] [extra train.py flags, e.g. --config.num_train_steps=500]
# Rerunning resumes the run in WORKDIR (default runs/refshapes) instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/refshapes}"
shift || true
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
# glibc: back large mapped blocks with transparent huge pages, e.g. XLA:CPU's 70 MB scratch of
# the 96x96 step, which glibc maps afresh every step (lts_jax/host_memory.py; ignored elsewhere).
export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1"
# Builds data/tfds/refcoco_masks/refshapes (seconds), trains, evaluates every split, prints the table.
# --cpu_devices=auto: on a CPU-only machine, one single-threaded JAX device per core (faster
# than one multi-threaded device; README, Benchmarks); GPU/TPU runs ignore it.
python train.py --config configs/refshapes.py --workdir "$WORKDIR" --cpu_devices=auto "$@"
# The same checkpoint with expressions shuffled within each batch: how much it relies on language.
python eval.py --workdir "$WORKDIR" --shuffle_expressions --cpu_devices=auto
