"""The distribution installs one top-level package, so nothing else named `api`, `worker` or `shared` can
replace ours, and a folder with such a name in the working directory cannot shadow them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_plain_top_level_names_are_not_ours(tmp_path: Path) -> None:
    for name in ("api", "worker", "shared"):
        result = _run(f"import {name}", tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, (name, result.stderr)


def test_a_folder_named_api_in_the_working_directory_does_not_shadow_ours(tmp_path: Path) -> None:
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "__init__.py").write_text("raise SystemExit('the wrong api package was imported')\n")
    (tmp_path / "api" / "app.py").write_text("raise SystemExit('the wrong api package was imported')\n")
    result = _run("import docker_http_passthrough.api.app as app; print(app.create_app.__module__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "docker_http_passthrough.api.app"


def test_the_job_function_resolves_by_its_import_name(tmp_path: Path) -> None:
    from docker_http_passthrough.shared.jobs import JOB_FUNCTION

    module, _, function = JOB_FUNCTION.rpartition(".")
    result = _run(f"import {module} as m; print(callable(m.{function}))", tmp_path)
    assert result.stdout.strip() == "True", result.stderr
