#!/usr/bin/env bash
# Check our Hugging Face exports with a real transformers 4.57 reader (tests/unit/test_hf_transformers4.py).
#
# Usage: scripts/check_transformers4.sh [--isolated] [VENV_DIR]      (VENV_DIR default: .cache/tf4venv)
#   default     venv with --system-site-packages: reuses the installed torch; the venv's own transformers 4.57
#               and huggingface-hub 0.x come first on sys.path and shadow the system's (~40 s, 160 MB).
#   --isolated  plain venv with its own torch (same version as ours) + transformers 4.57 (~45 s where a local
#               torch wheel is on pip's find-links, far longer where pip must download torch; ~1.1 GB).
# The venv is reused when it exists. Run from the repository root.
set -euo pipefail
isolated=0
if [[ "${1:-}" == "--isolated" ]]; then isolated=1; shift; fi
venv="${1:-.cache/tf4venv}"
if [[ ! -x "$venv/bin/python" ]]; then
  if (( isolated )); then
    python -m venv "$venv"
    torch_version=$(python -c 'import torch; print(torch.__version__.split("+")[0])')
    "$venv/bin/pip" install -q "torch==$torch_version" "transformers==4.57.*" safetensors
  else
    python -m venv --system-site-packages "$venv"
    # pip warns that the system's datasets wants a newer huggingface-hub: only this venv sees the older one.
    "$venv/bin/pip" install -q "transformers==4.57.*"
  fi
fi
"$venv/bin/python" -c 'import sys, transformers as t; v = t.__version__; sys.exit(0 if v.startswith("4.57") else f"transformers {v} in the venv, expected 4.57")'
LONGTRAIN_TF4_PYTHON="$venv/bin/python" python -m pytest -q tests/unit/test_hf_transformers4.py
