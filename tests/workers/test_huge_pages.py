"""Huge pages for torch's allocator: the command line's processes ask for them before torch reads
the variable, a user's own value wins, and the step-time profile is keyed by the setting."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from goodspec.scheduler.profiler import device_key, profile_key
from goodspec.workers import huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A process that imports the CLI as `goodspec` does, then allocates 64 MiB the way a runner's
# weights are (one torch buffer), touches it, and prints its huge pages in kB.
ALLOCATE = """
import goodspec.cli, torch
from pathlib import Path
x = torch.ones(64 << 20, dtype=torch.uint8)
rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
print(next(int(l.split()[1]) for l in rollup if l.startswith("AnonHugePages")))
"""


def _huge_kb(env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != huge_pages.ENV}
    if env_value is not None:
        env[huge_pages.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", ALLOCATE], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_a_users_own_value_wins(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "0")
    huge_pages.ask_for_huge_pages()
    assert os.environ[huge_pages.ENV] == "0"
    assert huge_pages.worker_env() == {huge_pages.ENV: "0"} and not huge_pages.huge_pages_on()
    monkeypatch.delenv(huge_pages.ENV)
    assert huge_pages.worker_env() == {huge_pages.ENV: "1"}  # workers get them by default
    huge_pages.ask_for_huge_pages()
    assert huge_pages.huge_pages_on()


def test_the_command_lines_processes_hold_their_buffers_in_huge_pages():
    if not THP_MODE.is_file() or "[never]" in THP_MODE.read_text():
        pytest.skip("this kernel gives no transparent huge pages")
    unset, off = _huge_kb(None), _huge_kb("0")
    assert unset >= 32 * 1024, (unset, off)  # most of the 64 MiB buffer
    if "[madvise]" in THP_MODE.read_text():  # with `always` the kernel gives them unasked
        assert off < unset, (unset, off)


def test_the_step_time_profile_is_keyed_by_huge_pages():
    target, draft = ("cpu", "float32", 121), ("cpu", "int8", 0)
    assert profile_key(*device_key(target, draft, "ray", True)) != \
        profile_key(*device_key(target, draft, "ray", False))
