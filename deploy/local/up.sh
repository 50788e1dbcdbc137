#!/usr/bin/env bash
# A working local gateway in one command: mock providers, Redis when redis-server is
# installed (else the embedded store, one replica), and the replicas; Ctrl-C stops it all.
# Usage: bash deploy/local/up.sh [--replicas N] [--port P] [--host H] [--config FILE]
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "up.sh: Python >= 3.11 is needed; set PYTHON=/path/to/python3.11 or newer" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  # Debian ships venv without ensurepip: remove the half-made .venv so the next run retries.
  if ! "$PY" -m venv .venv; then
    rm -rf .venv
    echo "up.sh: cannot create .venv: on Debian, apt-get install -y python3-venv" >&2
    exit 1
  fi
fi
# with the load extra (Locust, matplotlib), so `routerctl loadtest` and `simulate` work too
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[load]'
exec .venv/bin/routerctl up "$@"
