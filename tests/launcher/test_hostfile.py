"""Hostfile parsing (every bad line with its number and fix), include/exclude filters, SLURM node lists."""

from __future__ import annotations

import pytest

from launcher.__main__ import main
from launcher.hostfile import (
    Host,
    HostfileError,
    active_hosts,
    expand_nodelist,
    hostfile_from_slurm,
    parse_hostfile,
    parse_hostfile_text,
    slurm_slots,
)
from tests.pretrain.conftest import REPO


def test_comments_blank_lines_and_trailing_comments_are_skipped():
    text = "# cluster\n\nworker-0 slots=8   # first\n  worker-1\tslots=4\n10.0.0.7 slots=2\n"
    assert parse_hostfile_text(text) == [Host("worker-0", 8, 3), Host("worker-1", 4, 4), Host("10.0.0.7", 2, 5)]


def test_every_bad_line_is_reported_with_its_number_and_fix():
    text = "\n".join(["worker-0 slots=8", "worker-1", "worker-2 slots=0", "worker-3 slots=-1", "worker-4 slot=8",
                      "worker-0 slots=2", "user@worker-5 slots=8", "bad!name slots=1", "worker-6 slots=8 gpus=8",
                      "slots=8"])
    with pytest.raises(HostfileError) as caught:
        parse_hostfile_text(text, source="cluster")
    lines = str(caught.value).splitlines()
    assert lines == [
        "cluster line 2: 'worker-1': slots are missing; write 'worker-1 slots=N' (N = GPUs on that node, or CPU "
        "ranks with DS_ACCELERATOR=cpu)",
        "cluster line 3: 'worker-2 slots=0': slots=0 is not a positive whole number; write 'worker-2 slots=N' "
        "with N >= 1, or delete the line to leave the node out",
        "cluster line 4: 'worker-3 slots=-1': slots=-1 is not a positive whole number; write 'worker-3 slots=N' "
        "with N >= 1, or delete the line to leave the node out",
        "cluster line 5: 'worker-4 slot=8': expected exactly 'slots=N' after the host; write 'worker-4 slots=N'",
        "cluster line 6: 'worker-0 slots=2': host 'worker-0' is already listed on line 1; keep one line per node "
        "with its total slots",
        "cluster line 7: 'user@worker-5 slots=8': host 'user@worker-5' is malformed: '@' separates hosts in "
        "--include/--exclude; write the bare host name or address",
        "cluster line 8: 'bad!name slots=1': host 'bad!name' is malformed: not a host name (letters, digits, '-', "
        "'_' and '.' only, starting and ending with a letter or digit)",
        "cluster line 9: 'worker-6 slots=8 gpus=8': expected exactly 'slots=N' after the host; write "
        "'worker-6 slots=N'",
        "cluster line 10: 'slots=8': the host name is missing; write 'worker-0 slots=8'",
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# only comments\n   # and more\n"])
def test_a_file_without_hosts_is_an_error(text):
    with pytest.raises(HostfileError, match=r"^hosts lists no hosts; add one line per node, e.g. 'worker-0 slots=8'$"):
        parse_hostfile_text(text, source="hosts")


def test_a_missing_hostfile_is_an_error_not_a_silent_single_node_run(tmp_path):
    with pytest.raises(HostfileError, match="does not exist .DeepSpeed would silently run on this machine alone"):
        parse_hostfile(str(tmp_path / "nope"))


@pytest.mark.parametrize("name", ["one_node", "two_nodes", "cpu_loopback"])
def test_the_example_hostfiles_parse(name):
    hosts = parse_hostfile(str(REPO / "hostfiles" / name))
    assert [host.slots for host in hosts] == {"one_node": [8], "two_nodes": [8, 8], "cpu_loopback": [1, 1]}[name]


HOSTS = [Host("a", 4, 1), Host("b", 2, 2), Host("c", 1, 3)]


@pytest.mark.parametrize("include, exclude, expected", [
    ("", "", {"a": [0, 1, 2, 3], "b": [0, 1], "c": [0]}),
    ("b@a:1,3", "", {"a": [1, 3], "b": [0, 1]}),                 # rank order stays the hostfile's
    ("a@a:2", "", {"a": [2]}),                                    # DeepSpeed: a slot list narrows the host
    ("", "b", {"a": [0, 1, 2, 3], "c": [0]}),
    ("", "a:0,1@c", {"a": [2, 3], "b": [0, 1]}),
])
def test_include_and_exclude_follow_deepspeed(include, exclude, expected):
    assert dict(active_hosts(HOSTS, include, exclude)) == expected


@pytest.mark.parametrize("include, exclude, message", [
    ("d", "", "--include 'd': host 'd' is not in the hostfile"),
    ("b:2", "", r"--include 'b:2': b has slots 0..1, not '2'"),
    ("", "a@b@c", "leaves no slot to run on"),
    ("a", "b", "cannot be combined"),
])
def test_bad_filters_name_the_problem(include, exclude, message):
    with pytest.raises(HostfileError, match=message):
        active_hosts(HOSTS, include, exclude)


@pytest.mark.parametrize("nodelist, expected", [
    ("node01", ["node01"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1-2],b3,c[5]", ["a1", "a2", "b3", "c5"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("login1,node[3,1]", ["login1", "node3", "node1"]),
    ("n[1-2].cluster.local", ["n1.cluster.local", "n2.cluster.local"]),
])
def test_slurm_nodelists_expand_like_scontrol_show_hostnames(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("nodelist, message", [
    ("node[01-03", "'.' without ']'"), ("node01]", "']' without '.'"), ("node[3-1]", "runs backwards"),
    ("node[a-b]", "not a number or a range"), ("", "empty"),
])
def test_malformed_slurm_nodelists_are_errors(nodelist, message):
    with pytest.raises(ValueError, match=message):
        expand_nodelist(nodelist)


@pytest.mark.parametrize("environ, slots", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 4),
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "gpu:2"}, 2),
    ({"SLURM_GPUS_PER_NODE": "4"}, 4),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
    ({}, None),
])
def test_gpu_count_from_the_slurm_environment(environ, slots):
    assert slurm_slots(environ) == slots


def test_hostfile_from_slurm_writes_one_line_per_node(tmp_path, monkeypatch, capsys):
    environ = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-02,05]", "SLURM_GPUS_ON_NODE": "4"}
    assert hostfile_from_slurm(environ).splitlines() == [
        "# SLURM job 77: gpu[01-02,05], 4 slot(s) per node", "gpu01 slots=4", "gpu02 slots=4", "gpu05 slots=4"]
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    output = tmp_path / "job"
    assert main(["hostfile", "--from-slurm", "--slots", "2", "--output", str(output)]) == 0
    assert [(host.name, host.slots) for host in parse_hostfile(str(output))] == [
        ("gpu01", 2), ("gpu02", 2), ("gpu05", 2)]
    assert main(["hostfile", "--from-slurm"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["gpu01 slots=4", "gpu02 slots=4", "gpu05 slots=4"]


def test_hostfile_from_slurm_outside_a_job_or_without_gpus_says_what_to_do(monkeypatch, capsys):
    for name in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE",
                 "SLURM_JOB_GPUS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["hostfile", "--from-slurm"]) == 2
    assert "SLURM_JOB_NODELIST is not set: run this inside a SLURM job" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_NODELIST", "cpu[1-2]")
    assert main(["hostfile", "--from-slurm"]) == 2
    assert "the SLURM job names no GPUs" in capsys.readouterr().err
