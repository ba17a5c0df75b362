"""Benchmark docker-http-passthrough against references measured in the same run.

    .venv/bin/python -m bench [--size-mib 1024] [--quick]      (from the repository root)

Everything runs on 127.0.0.1 and is started and stopped by the benchmark: a CNCF registry, nginx (the static-file
reference), skopeo (the cold-copy reference), redis-server, the server under test
(`python -m docker_http_passthrough serve`, embedded or two-tier with `... worker`), counting/throttling proxies.
All files live in one temporary directory that is removed at the end, also on Ctrl-C, SIGTERM or when the
time limit (--time-limit) runs out.

Images are generated here: layers of random (incompressible) bytes mixed with word-salad text (compressible),
built streaming into temporary files, gzip level 1, pushed with a streaming monolithic upload.

It prints a table of figures, each beside its same-run reference and target, with PASS/FAIL. A missed target
does not change the exit status (this is a measuring tool); exit status 1 means an error: wrong bytes, a failed
request, or something that could not be started. 2: bad arguments, 3: time limit hit, 130: interrupted.

Modules: `harness` (the plan, the parts it starts, the phases in order), one module per phase (`cold`, `warm`,
`memory`, `fleet`), `references` (nginx, skopeo), `images` and `checks` (generated images, the reference archive),
`clients` (curl, raw-socket clients), `processes` (RSS, CPU, profiles, server log), `report`. The test harness
(registry, proxy, server and worker processes) comes from `tests.support`, importable because the benchmark runs
as a module from the repository root.
"""
