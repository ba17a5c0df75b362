"""``python -m bench``: parse the options, run the phases under a time limit, print the table."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import os
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import bench
from bench.harness import PHASES, Bench
from bench.report import NGINX, Report, machine_facts, say


FD_LIMIT = 65536


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=None, help="size of the big image (default 1024; 128 quick)")
    parser.add_argument("--quick", action="store_true", help="small images, fewer clients, ~1-2 minutes")
    parser.add_argument("--runs", type=int, help="warm single-client repetitions (default 5; 2 quick)")
    parser.add_argument("--cold-runs", type=int, help="cold repetitions, each side (default 3; 1 quick)")
    parser.add_argument("--clients", type=int, help="concurrent clients in the two-tier run (default 100; 20 quick)")
    parser.add_argument("--slow-clients", type=int, help="slow clients (default 200; 50 quick)")
    parser.add_argument("--slow-seconds", type=float, help="slow-client phase length (default 60; 10 quick)")
    parser.add_argument("--fast-clients", type=int, help="warm clients at once against ours and nginx (default 100; "
                        "20 quick)")
    parser.add_argument("--fast-runs", type=int, help="repetitions of each fast-clients batch, each side (default 3; 1 "
                        "quick)")
    parser.add_argument("--thousand", type=int, help="slow clients at once against ours and nginx (default 1000; "
                        "200 quick)")
    parser.add_argument("--thousand-seconds", type=float, help="their phase length (default 60; 10 quick)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="run only these phases (default: all); the warm ones start from one cold download")
    parser.add_argument("--time-limit", type=float, help="give up after this many seconds (default 2400; 600 quick)")
    parser.add_argument("--profile", metavar="DIR", help="record py-spy profiles of the API (if py-spy is installed)")
    parser.add_argument("--grace", type=float, help="PREPARE_GRACE for the servers (default: the server's, 1 s)")
    parser.add_argument("--server-env", action="append", metavar="KEY=VALUE",
                        help="extra environment for the servers and workers (experiments, e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) for inspection")
    args = parser.parse_args()
    if args.size_mib is not None and args.size_mib < 4:
        parser.error("--size-mib must be at least 4")
    return args


def run_within_limit(run: Bench, limit: float) -> int:
    """Run the phases; Ctrl-C, SIGTERM and the time limit stop them. Always cleans up. Returns the exit status."""
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        _thread.interrupt_main()  # KeyboardInterrupt in the main thread, which then cleans up

    watchdog = threading.Timer(limit, expire)
    watchdog.daemon = True
    watchdog.start()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    status = 0
    try:
        run.run()
    except KeyboardInterrupt:
        status = 3 if timed_out.is_set() else 130
        say("time limit reached, stopping" if timed_out.is_set() else "interrupted, stopping")
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        run.report.error(f"{type(exc).__name__}: {exc}")
        status = 1
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        run.cleanup()
        if run.args.keep:
            say(f"kept {run.work}")
        else:
            shutil.rmtree(run.work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status


def print_summary(report: Report, facts: list[tuple[str, str]], quick: bool, seconds: float) -> None:
    print()
    print(f"docker-http-passthrough benchmark, {'--quick' if quick else 'full'} run, {seconds:.0f} s")
    for key, value in facts:
        print(f"- {key}: {value}")
    print(f"- load average at end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print()
    print(report.table())
    if report.errors:
        print()
        print("ERRORS:")
        for error in report.errors:
            print(f"- {error}")
    passed = sum(r.result == "PASS" for r in report.rows)
    failed = sum(r.result == "FAIL" for r in report.rows)
    print()
    print(f"{passed} targets met, {failed} missed; {len(report.errors)} errors")


def raise_fd_limit() -> None:
    """A thousand clients, and the servers they talk to (children inherit the limit): as root the hard limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, FD_LIMIT)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    args = parse_args()
    raise_fd_limit()
    # Loopback only: never let an environment proxy see (or route) our traffic.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
    for tool in ("curl", "skopeo", NGINX, "redis-server", "/usr/bin/docker-registry"):
        if not shutil.which(tool):
            print(f"bench: {tool} is missing", file=sys.stderr)
            return 1

    report = Report()
    say("machine:")
    facts = machine_facts()
    for key, value in facts:
        say(f"  {key}: {value}")
    run = Bench(args, Path(tempfile.mkdtemp(prefix="dhp-bench-")), report)
    started = time.monotonic()
    status = run_within_limit(run, args.time_limit or (600.0 if args.quick else 2400.0))
    print_summary(report, facts, args.quick, time.monotonic() - started)
    return status or (1 if report.errors else 0)


if __name__ == "__main__":
    sys.exit(main())
