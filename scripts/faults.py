#!/usr/bin/env python3
"""Fault scenarios against real processes, and what each costs: the numbers of issue 10.

    .venv/bin/python scripts/faults.py [--only NAME ...] [--list] [--fuzz-requests N] [--seed S] [--keep]

Everything runs on 127.0.0.1 and is started and stopped here: a CNCF registry behind a counting, throttling
proxy, and the server under test (`python -m docker_http_passthrough serve`), with Redis and RQ workers where a
scenario deploys two tiers; the settings' defaults unless a scenario says otherwise. For each fault it prints:

- the extra seconds the waiting devices paid (the same downloads with and without the fault);
- the extra upstream bytes (the API's dhp_upstream_bytes_total, or the body bytes through the registry proxy);
- what is left on disk (temporary and lease files in CACHE_DIR) and in Redis (per-job keys, dead workers)
  afterwards;
- for hostile input: volume and findings;
- the server's peak memory, and its health after the run.

Each fault is one function registered with @fault(name, about) (faultlab.py: the Lab and what scenarios share)
that takes the Lab and returns its Figures (figure name → value, in print order). The scenarios live by kind:
faults_clients.py (slow clients, malformed requests, fuzz), faults_jobs.py (dead workers, Redis restarts and
outages, a full disk), faults_upstream.py (registry cuts, Retry-After, hostile registries). Add a scenario by
adding a function to such a module (imported below). It is a measuring tool: a bad figure does not change the exit
status; 1 means a scenario could not run. The disk scenarios mount a tmpfs (root only).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# Scenario modules beside this script register into this table with `from faults import fault`: run as a script,
# this module must be the one they import.
sys.modules.setdefault("faults", sys.modules[__name__])
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_name, None)  # loopback only: no environment proxy may see our traffic

import faults_clients  # noqa: E402, F401 - registers its scenarios
import faults_jobs  # noqa: E402, F401 - registers its scenarios
import faults_upstream  # noqa: E402, F401 - registers its scenarios (cuts, Retry-After, hostile registries)
from faultlab import FAULTS, Fault, Figures, Lab  # noqa: E402


# --------------------------------------------------------------------------- running


def print_figures(fault_: Fault, figures: Figures, seconds: float) -> None:
    print(f"\n== {fault_.name}: {fault_.about} ({seconds:.0f} s)")
    width = max(len(name) for name in figures)
    for name, value in figures.items():
        print(f"  {name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(FAULTS), help="run these faults only")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--fuzz-requests", type=int, default=int(os.environ.get("DHP_FUZZ_REQUESTS", "20000")))
    parser.add_argument("--seed", type=int, default=random.randrange(1 << 31))
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, caches)")
    args = parser.parse_args(argv)
    if args.list:
        for item in FAULTS.values():
            print(f"{item.name:20} {item.about}")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="dhp-faults-"))
    failed = False
    lab = Lab(workdir, args.fuzz_requests, args.seed)
    try:
        for name in args.only or list(FAULTS):
            started = time.monotonic()
            try:
                figures = FAULTS[name].run(lab)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException:  # one scenario's failure (or a skip: no root) must not hide the others' figures
                failed = True
                print(f"\n== {name}: could not run\n{traceback.format_exc()}")
                continue
            print_figures(FAULTS[name], figures, time.monotonic() - started)
    finally:
        lab.close()
        if args.keep:
            print(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
