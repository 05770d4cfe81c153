#!/usr/bin/env bash
# Create (or reuse) the virtual environment in .venv and install g3n into it, editable.
#   scripts/setup.sh          g3n and what it needs to run
#   scripts/setup.sh --test   plus the test tools (pytest, transformers as the numerical reference)
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
python=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($python --version)"
  $python -m venv .venv
fi
stamp=".venv/.g3n-installed$extras"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup] installing g3n$extras into .venv (the first time downloads PyTorch; this takes a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
echo "$want" > "$stamp"
