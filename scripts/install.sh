#!/usr/bin/env bash
# Install and start docker-http-passthrough in embedded mode (no Redis needed) on Debian 12 / Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import ensurepip" >/dev/null 2>&1; then  # Debian's python3 keeps venv in a separate package
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
fi
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/docker-http-passthrough serve "$@"
