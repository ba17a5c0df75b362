#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine (apt + pip), then run every test.
# Real parts: CNCF distribution (docker-registry), redis-server, dockerd (docker.io), busybox-static, and Debian's
# chromium for the browser tests (Playwright drives it; `playwright install` downloads a browser and is never run).
# Deployment tests (-m deploy; leave them out locally with -m 'not deploy'): debootstrap builds the local base
# image, docker-compose runs compose.yaml, kubectl (part of this machine's image) renders kubernetes/, Node.js
# runs KEDA's schema validator from npm.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry redis-server docker.io busybox-static apache2-utils iptables ca-certificates chromium curl
  debootstrap docker-compose)
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)
# Debian's own python3 needs python3-venv for `python3 -m venv`; other Pythons (pyenv) bring it.
python3 -c "import ensurepip" >/dev/null 2>&1 || APT_PACKAGES+=(python3-venv)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test,docs]'
# KEDA's ScaledObject schema (tests/support/keda_schema.py), inside the venv so it goes with it.
KEDA_MODELS=@kubernetes-models/keda@2.0.0
grep -qs '"version": "2.0.0"' .venv/node/node_modules/@kubernetes-models/keda/package.json ||
  npm install --prefix .venv/node --no-save --no-audit --no-fund --silent "$KEDA_MODELS"

exec .venv/bin/python -m pytest "$@"
