"""api.supervisor: how many API processes a machine or container gets (CPU affinity, capped by a cgroup CPU
quota — a container's CPU limit, not the host's CPU count), and the sockets they share a port through."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from docker_http_passthrough.api.supervisor import bind_reuseport, cgroup_cpu_quota, usable_cpus


def cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "cgroup").write_text(membership)
    return root, tmp_path / "cgroup"


@pytest.mark.parametrize("membership, files, quota", [
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # v2, no limit
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 1.5),  # v2 in a container: its own cgroup is the root
    ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "max 100000\n",
                                 "kubepods/pod1/cpu.max": "200000 100000\n"}, 2.0),  # the pod's limit, above
    ("0::/a/b\n", {"a/b/cpu.max": "50000 100000\n", "a/cpu.max": "400000 100000\n"}, 0.5),  # the tightest
    ("4:cpu,cpuacct:/docker/x\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000\n",
                                    "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
    ("4:cpu,cpuacct:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("0::/\n", {}, None),  # nothing readable
])
def test_cgroup_cpu_quota(tmp_path, membership, files, quota):
    root, member = cgroup(tmp_path, membership, files)
    assert cgroup_cpu_quota(root, member) == quota


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    from docker_http_passthrough.api import supervisor

    for quota, expected in ((None, 8), (1.5, 2), (0.25, 1), (16.0, 8)):
        monkeypatch.setattr(supervisor, "cgroup_cpu_quota", lambda q=quota: q)
        assert usable_cpus() == expected


def test_reuseport_sockets_share_a_port_and_a_taken_port_says_so():
    first = bind_reuseport("127.0.0.1", 0)
    port = first.getsockname()[1]
    second = bind_reuseport("127.0.0.1", port)
    first.listen()
    second.listen()
    with socket.socket() as plain:
        with pytest.raises(OSError, match="in use"):
            plain.bind(("127.0.0.1", port))
    first.close()
    second.close()
