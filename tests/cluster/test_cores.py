"""The cores the engine's thread default divides: the affinity mask and a container's CPU quota."""

import os

from goodspec.cluster.cores import cgroup_cpu_limit, usable_cores


def test_a_cgroup_v2_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # docker --cpus 1.5
    assert cgroup_cpu_limit(tmp_path) == 1.5
    assert usable_cores(tmp_path) == min(len(os.sched_getaffinity(0)), 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path) == 1


def test_no_quota_leaves_the_affinity_mask(tmp_path):
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_a_cgroup_v1_quota_is_read_and_minus_one_means_none(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_limit(tmp_path) == 4.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_a_garbled_file_reads_as_no_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("lots\n")
    assert cgroup_cpu_limit(tmp_path) is None
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_this_machine(tmp_path):
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_a_nested_cgroup_without_its_own_namespace_reads_its_path_and_parents(tmp_path):
    """A process in /kubepods/pod1/box (no cgroup namespace: it sees the host's hierarchy): the
    tightest quota on the way up binds; an unlimited own cgroup does not hide a parent's."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    own = tmp_path / "kubepods" / "pod1" / "box"
    own.mkdir(parents=True)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("0::/kubepods/pod1/box\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (own / "cpu.max").write_text("max 100000\n")
    (own.parent / "cpu.max").write_text("300000 100000\n")  # the pod's limits.cpu: 3
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == 3.0
    (own / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == 1.5
    self_cgroup.write_text("0::/\n")  # its own namespace: the mount's root is its cgroup
    assert cgroup_cpu_limit(tmp_path, self_cgroup) is None


def test_a_cgroup_v1_cpu_controller_path_is_followed(tmp_path):
    own = tmp_path / "cpu" / "docker" / "abc"
    own.mkdir(parents=True)
    (own / "cpu.cfs_period_us").write_text("100000\n")
    (own / "cpu.cfs_quota_us").write_text("200000\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_cpu_limit(tmp_path, self_cgroup) == 2.0
