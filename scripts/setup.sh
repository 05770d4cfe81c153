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
if [[ -z "${CMAKE_ARGS:-}" && "$(uname -m)" == "x86_64" ]]; then
  # llama-cpp-python builds llama.cpp from source, by default for this CPU (-march=native). On CPUs
  # with AVX-512 FP16 and AMX (Intel Sapphire Rapids) that build (0.3.36) computes f16 products
  # wrongly (logits off by 11 on the tiny model) and crashes on q8_0 ones; an AVX2 build is right
  # on every x86-64 CPU of the last decade. Set CMAKE_ARGS yourself for another build (CUDA: -DGGML_CUDA=on).
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
echo "[setup] installing g3n$extras into .venv (the first time downloads PyTorch; this takes a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".$extras"
echo "$want" > "$stamp"
