#!/usr/bin/env bash
# Re-vendor the Mermaid runtime the documentation site draws its diagrams with (docs/assets/vendor/).
# Pinned: change MERMAID_VERSION, run this, check the diagrams (tests/test_docs_site.py), update NOTICE.
set -euo pipefail
cd "$(dirname "$0")/.."
MERMAID_VERSION=12.3.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "mermaid@${MERMAID_VERSION}" >/dev/null && tar xzf "mermaid-${MERMAID_VERSION}.tgz")
cp "$work/package/dist/mermaid.min.js" docs/assets/vendor/mermaid.min.js
cp "$work/package/LICENSE" docs/assets/vendor/mermaid.LICENSE
sha256sum docs/assets/vendor/mermaid.min.js
