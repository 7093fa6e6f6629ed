"""The doctor: each difference from the launching host is a FAIL with its fix; unreachable hosts fail fast.

The multi-node checks over ssh (a host without sshd) are in test_multinode.py; here the doctor runs on
this machine (``local`` transport) and on made-up probe answers.
"""

from __future__ import annotations

import socket
import sys

from launcher import doctor, launch
from launcher.probe import local_facts
from tests.launcher.conftest import launcher_env, run_launcher, write_hostfile
from tests.pretrain.conftest import write_experiment


def healthy_answer(reference: dict) -> dict:
    return {**reference, "accelerators": {"mode": "cuda", "count": 8},
            "disk": {"path": "/runs/x", "checked": "/runs", "free_bytes": 500 * doctor.GIB, "writable": True},
            "sources": [{"url": "/data/a-0.tar", "ok": True, "detail": "k.jpg"}], "port": {"port": 29500, "free": True}}


def test_a_healthy_host_has_no_problems_and_a_summary():
    reference = local_facts()
    target = doctor.Target(hosts={"w0": list(range(8))}, workdir="/w", repository="/w", python="/w/py")
    assert doctor.compare(reference, healthy_answer(reference), "w0", 8, target) == []
    assert "8 GPU(s), 500 GiB free, 1 shard source(s) readable, port 29500 free" in doctor.summarize(
        healthy_answer(reference))


def test_each_difference_is_a_problem_with_a_fix():
    reference = local_facts()
    answer = healthy_answer(reference)
    answer.update(python="3.10.2", packages={**reference["packages"], "deepspeed": "0.14.0", "timm": None},
                  revision={"commit": "0" * 40, "changes": None}, accelerators={"mode": "cuda", "count": 4},
                  disk={"path": "/runs/x", "checked": "/runs", "free_bytes": 2 * doctor.GIB, "writable": True},
                  sources=[{"url": "s3://b/a-0.tar", "ok": False, "detail": "NoSuchKey"}],
                  port={"port": 29500, "free": False})
    target = doctor.Target(hosts={"w1": list(range(8))}, workdir="/w", repository="/w", python="/w/py")
    problems = doctor.compare(reference, answer, "w1", 8, target)
    assert problems == [
        f"python 3.10.2 (here {reference['python']}) -> install Python {reference['python']} and run `make setup` "
        f"on w1",
        f"deepspeed 0.14.0 (here {reference['packages']['deepspeed']}) -> `pip install -r requirements.txt` in "
        f"/w/py on w1",
        f"timm missing (here {reference['packages']['timm']}) -> `pip install -r requirements.txt` in /w/py on w1",
        f"code at 0000000000 (here {str(reference['revision']['commit'])[:10]}) -> `git checkout "
        f"{reference['revision']['commit']}` on w1",
        "4 GPU(s) < slots=8 -> lower slots to 4 for w1 in the hostfile",
        "2.0 GiB free under /runs (< 10 GiB) -> free space or point run.output_dir elsewhere",
        "cannot read shard s3://b/a-0.tar: NoSuchKey -> check the path, mounts and credentials on w1",
        "master port 29500 is in use on w1 -> pass --master_port with a free port, or stop what holds it",
    ]


def test_credentials_the_run_needs_are_checked_on_each_node_by_name_only():
    reference = local_facts()
    target = doctor.Target(hosts={"w1": [0]}, workdir="/w", repository="/w", python="/w/py")
    answer = {**healthy_answer(reference),
              "aws_credentials": {"found": False, "detail": "none in the environment, ~/.aws or an instance role"},
              "sources": [{"url": "/data/a-0.tar", "ok": True, "detail": "k.jpg"},
                          {"url": "s3://b/t-{0..3}.tar", "ok": None, "detail": "not read: no AWS credentials"}],
              "secrets": {"WANDB_API_KEY": False, "HF_TOKEN": True}}
    assert doctor.compare(reference, answer, "w1", 1, target) == [
        "no AWS credentials on w1 for s3://b/t-{0..3}.tar (none in the environment, ~/.aws or an instance role) -> "
        "write them to ~/.aws/credentials on w1 (`aws configure`, mode 0600; AWS_PROFILE picks a profile) or give "
        "w1 an instance role; AWS keys set here are not sent to the nodes",
        "WANDB_API_KEY is not set on w1 (the run needs it: --export WANDB_API_KEY) -> set it where commands run "
        "over ssh see it on w1: `export WANDB_API_KEY=...` at the top of ~/.bashrc, or in a mode-0600 file sourced "
        "from there; secrets are not sent from here",
    ]
    assert "AWS credentials" not in doctor.summarize(answer) and "HF_TOKEN set" in doctor.summarize(answer)
    shared = {"found": True, "method": "shared-credentials-file", "file": "/home/u/.aws/credentials", "mode": "0644",
              "private": False}
    answer.update(aws_credentials=shared, secrets={"HF_TOKEN": True},
                  sources=[{"url": "s3://b/t-0.tar", "ok": True, "detail": "k.jpg"}])
    assert doctor.compare(reference, answer, "w1", 1, target) == [
        "/home/u/.aws/credentials on w1 can be read by other users (mode 0644) -> `chmod 600 "
        "/home/u/.aws/credentials` on w1"]
    answer["aws_credentials"].update(mode="0600", private=True)
    assert doctor.compare(reference, answer, "w1", 1, target) == []
    assert "AWS credentials (shared-credentials-file), HF_TOKEN set, 1 shard source(s) readable" in \
        doctor.summarize(answer)


def test_unreachable_code_interpreter_or_a_hung_host_fail_with_the_reason(tmp_path):
    hung = tmp_path / "hung-python"
    hung.write_text("#!/bin/sh\nsleep 30\n")
    hung.chmod(0o755)
    base = {"hosts": {"127.0.0.1": [0]}, "repository": launch.REPOSITORY, "transport": "local", "timeout_s": 2}
    cases = [(doctor.Target(workdir="/no/such/dir", python=sys.executable, **base), "no directory /no/such/dir on"),
             (doctor.Target(workdir=str(tmp_path), python="/no/python", **base), "no /no/python on 127.0.0.1: run "
                                                                                  "`make setup` there"),
             (doctor.Target(workdir=str(tmp_path), python=str(hung), **base), "no answer within 2s")]
    for target, message in cases:
        (report,) = doctor.run_doctor(target)
        assert not report.ok and message in report.problems[0]


def test_doctor_on_this_machine_reports_each_failure_then_ok(tmp_path, tiny_shards):
    hostfile = write_hostfile(tmp_path, "127.0.0.1")
    broken = write_experiment(tmp_path, {"train": str(tmp_path / "missing-{000000..000003}.tar")})
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = launcher_env()
        env.pop("DS_ACCELERATOR")  # no GPU here, and not asked for CPU ranks
        result = run_launcher("doctor", "--hostfile", hostfile, "--config", broken, "--master_port", port,
                              "--min-free-gb", "0.1", env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    rows = result.stdout.splitlines()
    assert rows[1].split()[:3] == ["HOST", "SLOTS", "STATUS"]
    assert rows[2].split()[:3] == ["127.0.0.1", "1", "FAIL"]
    details = "\n".join(rows[2:])
    assert f"cannot read shard {tmp_path}/missing-000000.tar: SourceNotFound" in details
    assert f"master port {port} is in use on 127.0.0.1" in details
    assert "0 GPU(s) < slots=1 -> set DS_ACCELERATOR=cpu for CPU ranks" in details
    assert rows[-1] == "doctor: 1 of 1 host(s) FAIL (127.0.0.1); fix them or leave them out with --exclude"

    good = write_experiment(tmp_path, tiny_shards)
    result = run_launcher("doctor", "--hostfile", hostfile, "--config", good, "--min-free-gb", "0.1", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    row = result.stdout.splitlines()[2]
    assert row.split()[:3] == ["127.0.0.1", "1", "OK"] and "CPU mode" in row and "1 shard source(s) readable" in row
    assert result.stdout.splitlines()[-1] == "doctor: all 1 host(s) OK"
