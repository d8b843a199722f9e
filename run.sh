#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine (only Python needed), then runs:
#   bash run.sh demo    the demo on real flower photos (../shared/data/flowers102 or $TAXOCLIP_DATA)
#   bash run.sh test    the test suite
#   bash run.sh bench   the benchmarks (table + JSON in benchmarks/results/)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${TAXOCLIP_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# Re-install only when pyproject.toml changed since the last install.
stamp="$VENV/.taxoclip-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[models,labels,serve,onnx,dev]"
  touch "$stamp"
fi

what=${1:-}
shift || true
case "$what" in
  demo) exec "$VENV/bin/taxoclip" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) exec "$VENV/bin/python" benchmarks/run.py "$@" ;;
  *) echo "usage: bash run.sh demo|test|bench [args...]" >&2; exit 2 ;;
esac
