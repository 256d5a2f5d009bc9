"""Memory checks (mfac.resources): sizes that cannot fit are refused before anything is allocated,
with what they need and the setting to lower; an unknown amount of memory refuses nothing."""

import pytest
import torch

from mfac import MFAC, SlidingWindowFisherInverse
from mfac.fisher import BlockFisherInverse
from mfac.models import mlp
from mfac.resources import InsufficientMemoryError


def test_impossible_window_is_refused_before_allocating():
    with pytest.raises(InsufficientMemoryError, match=r"needs .* TB but only .* available.*lower window"):
        SlidingWindowFisherInverse(10**9, 10**5, 1e-2)
    with pytest.raises(MemoryError, match="lower window"):
        MFAC([torch.nn.Parameter(torch.zeros(10**6))], window=10**7)


def test_block_inverse_and_gradient_matrix_are_checked_against_available_memory(monkeypatch):
    from mfac import resources
    from mfac.grads import collect_gradients

    grads = torch.randn(64, 4000)  # block factors of 4000 x 64 numbers plus float64 work: over 1 MB
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1_000_000)
    with pytest.raises(InsufficientMemoryError, match="block_size"):
        BlockFisherInverse(grads, 1e-2, 128)
    model = mlp(64, (64,))
    data = iter([(torch.randn(4, 64), torch.zeros(4, dtype=torch.long))] * 100)
    with pytest.raises(InsufficientMemoryError, match="num_grads"):
        collect_gradients(model, dict(model.named_parameters()), data, torch.nn.functional.cross_entropy,
                          num_grads=100)
    monkeypatch.setattr(resources, "available_bytes", lambda device: None)  # unknown: no refusal
    assert BlockFisherInverse(grads, 1e-2, 128).dim == 4000


# The limits a process really lives under: RLIMIT_AS and cgroups as well as MemAvailable --------------

def test_a_window_beyond_the_address_space_limit_is_refused_with_the_numbers():
    """Under ``ulimit -v`` a window that cannot be mapped is refused up front, naming the limit,
    while one that fits is still built (MemAvailable alone would accept both)."""
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from mfac import SlidingWindowFisherInverse\n"
        "from mfac.resources import InsufficientMemoryError, memory_limits\n"
        "size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 300 * 2**20, resource.RLIM_INFINITY))\n"
        "assert memory_limits()['RLIMIT_AS (ulimit -v)'] <= 300 * 2**20\n"
        "SlidingWindowFisherInverse(10**5, 16, 1e-2)  # 6 MB: fits\n"
        "try:\n"
        "    SlidingWindowFisherInverse(10**6, 256, 1e-2)  # 1 GB: does not\n"
        "except InsufficientMemoryError as error:\n"
        "    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs 976.6 MB but only" in done.stdout and "RLIMIT_AS" in done.stdout and "lower window" in done.stdout


def fake_root(tmp_path, cgroup: str, files: dict) -> str:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "cgroup").write_text(cgroup)
    for name, text in files.items():
        path = tmp_path / "sys" / "fs" / "cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return str(tmp_path)


def test_cgroup_v2_limits_of_the_process_and_its_ancestors(tmp_path):
    from mfac.resources import cgroup_available

    root = fake_root(tmp_path, "0::/user.slice/job\n", {
        "user.slice/job/memory.max": "max\n", "user.slice/job/memory.current": "100\n",
        "user.slice/memory.max": "8000000000\n", "user.slice/memory.current": "3000000000\n",
        "user.slice/memory.stat": "anon 2000000000\nactive_file 1\ninactive_file 500000000\n",
        "memory.current": "9\n"})  # the root cgroup has no memory.max: no limit there
    assert cgroup_available(root) == 8_000_000_000 - (3_000_000_000 - 500_000_000)
    nested = fake_root(tmp_path / "nested", "0::/a/b\n", {
        "a/memory.max": "4000\n", "a/memory.current": "1000\n", "a/b/memory.max": "3500\n", "a/b/memory.current": "900\n"})
    assert cgroup_available(nested) == 2600  # the tighter of the two
    unlimited = fake_root(tmp_path / "unlimited", "0::/\n", {"memory.max": "max\n", "memory.current": "5\n"})
    assert cgroup_available(unlimited) is None


def test_cgroup_v1_memory_controller(tmp_path):
    from mfac.resources import cgroup_available

    root = fake_root(tmp_path, "12:pids:/x\n4:memory:/docker/abc\n1:name=systemd:/x\n0::/\n", {
        "memory/docker/abc/memory.limit_in_bytes": "2147483648\n",
        "memory/docker/abc/memory.usage_in_bytes": "1073741824\n",
        "memory/docker/abc/memory.stat": "cache 10\ninactive_file 7\ntotal_inactive_file 268435456\n",
        "memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1 writes "no limit" as about 2^63
        "memory/memory.usage_in_bytes": "5\n"})
    assert cgroup_available(root) == 2147483648 - (1073741824 - 268435456)
    # A container that sees the host's path but mounts its own cgroup as the root: the root's limit counts.
    moved = fake_root(tmp_path / "moved", "4:cpu,memory:/host/path\n", {
        "memory/memory.limit_in_bytes": "1000\n", "memory/memory.usage_in_bytes": "400\n"})
    assert cgroup_available(moved) == 600
    assert cgroup_available(tmp_path / "nothing") is None


def test_available_bytes_is_the_smallest_bound(tmp_path, monkeypatch):
    from mfac import resources

    root = fake_root(tmp_path, "0::/\n", {"memory.max": "3000000\n", "memory.current": "1000000\n"})
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 9000 kB\nMemAvailable: 5000 kB\n")
    assert resources.memory_limits("cpu", root)["the cgroup memory limit"] == 2_000_000
    assert resources.available_bytes("cpu", root) == 2_000_000
    (tmp_path / "proc" / "meminfo").write_text("MemAvailable: 1000 kB\n")
    assert resources.available_bytes("cpu", root) == 1_024_000
    monkeypatch.setattr(resources, "cgroup_available", lambda root="/": 4096)
    with pytest.raises(InsufficientMemoryError, match=r"needs 8.0 KB but only 4.0 KB .*cgroup memory limit.*lower"):
        resources.check_fits(8192, "cpu", "a test", "lower it")
