"""Validate KEDA objects against KEDA's own schema.

kubernetes-validate bundles only Kubernetes' schemas. KEDA's schema comes from the npm package
@kubernetes-models/keda (MIT; generated from the API types of kedacore/keda, KEDA_MODELS_VERSION below), which
scripts/test.sh installs into .venv/node; its compiled JSON-schema validators run under Node.js.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from tests.support.services import REPO_ROOT

KEDA_MODELS_VERSION = "2.0.0"
NODE_PREFIX = REPO_ROOT / ".venv" / "node"
MODELS = NODE_PREFIX / "node_modules" / "@kubernetes-models" / "keda"

_SCRIPT = """
import { pathToFileURL } from "node:url";
const [models, input] = process.argv.slice(1);
const errors = [];
for (const obj of JSON.parse(input)) {
  const [group, version] = obj.apiVersion.split("/");
  const module = await import(pathToFileURL(`${models}/${group}/${version}/${obj.kind}.js`).href);
  try { new module[obj.kind](obj).validate(); }
  catch (e) { errors.push(`${obj.kind}/${obj.metadata?.name}: ${e.message}`); }
}
console.log(JSON.stringify(errors));
"""


def available() -> str | None:
    """None when usable, else why not."""
    if shutil.which("node") is None:
        return "node is not installed"
    package = MODELS / "package.json"
    if not package.exists():
        return f"@kubernetes-models/keda is not installed under {NODE_PREFIX} (scripts/test.sh installs it)"
    installed = json.loads(package.read_text())["version"]
    if installed != KEDA_MODELS_VERSION:
        return f"@kubernetes-models/keda {installed} is installed, the tests expect {KEDA_MODELS_VERSION}"
    return None


def validation_errors(objects: list[dict]) -> list[str]:
    """One message per object that KEDA's schema rejects (keda.sh/v1alpha1 kinds)."""
    result = subprocess.run(["node", "--input-type=module", "-e", _SCRIPT, str(MODELS), json.dumps(objects)],
                            capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)
