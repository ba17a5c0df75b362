#!/usr/bin/env bash
# Install and start docker-http-passthrough in embedded mode (no Redis needed) on Debian 12 / Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e .
exec .venv/bin/docker-http-passthrough serve "$@"
