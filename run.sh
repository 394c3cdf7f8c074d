#!/usr/bin/env bash
# One-step set-up and run for cryoprior.
#   bash run.sh demo [ARGS]   create .venv if needed, install, run `cryoprior demo ARGS`
#   bash run.sh test          create .venv if needed, install, run lint + the test suite
#   bash run.sh cli ARGS      create .venv if needed, install, run `cryoprior ARGS`
# PyTorch is installed first and pinned (torch==2.13.0) so pip never pulls a CUDA stack
# it does not need; set CRYOPRIOR_TORCH to ask for another torch requirement.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${CRYOPRIOR_VENV:-.venv}
stamp="$VENV/.cryoprior-installed"
want=$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] setting up $VENV (one time) ..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${CRYOPRIOR_TORCH:-torch==2.13.0}"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) exec "$VENV/bin/cryoprior" demo "$@" ;;
  cli)  exec "$VENV/bin/cryoprior" "$@" ;;
  test)
    "$VENV/bin/ruff" check src tests benchmarks
    "$VENV/bin/ruff" format --check src tests benchmarks
    exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash run.sh demo|test|cli [ARGS]" >&2; exit 2 ;;
esac
