#!/usr/bin/env bash
# One entry point that sets up everything on a fresh machine, then runs:
#   bash scripts/run.sh demo    the main job on a small bundled default (offline, CPU, a few minutes)
#   bash scripts/run.sh test    the test suite (what CI runs)
# The virtual environment lives in .venv and is reused when it is already complete.
set -euo pipefail
cd "$(dirname "$0")/.."

# A CPU build of torch unless told otherwise: plain `pip install torch` pulls several GB of CUDA libraries.
# Override on a GPU machine, e.g. LINCAT_TORCH='torch==2.11.0' (or install torch into .venv yourself first).
TORCH_SPEC="${LINCAT_TORCH:-torch==2.13.0}"

if [ ! -f .venv/.lincat-ready ] || [ pyproject.toml -nt .venv/.lincat-ready ] || [ scripts/constraints.txt -nt .venv/.lincat-ready ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        .venv/bin/python -m pip install -q "$TORCH_SPEC" || .venv/bin/python -m pip install -q torch \
            --index-url https://download.pytorch.org/whl/cpu
    fi
    .venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[triton,eval,dev]"
    touch .venv/.lincat-ready
fi

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
case "${1:-}" in
    demo) shift; exec .venv/bin/lincat demo "$@" ;;
    test) shift; exec .venv/bin/python -m pytest -q "$@" ;;
    *) echo "usage: bash scripts/run.sh demo|test [args]" >&2; exit 2 ;;
esac
