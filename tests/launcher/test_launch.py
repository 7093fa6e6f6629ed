"""The deepspeed command the launcher builds (``--dry-run``) and the option checks that stop a run early."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from launcher import launch
from launcher.__main__ import main
from tests.launcher.conftest import write_hostfile
from tests.pretrain.conftest import write_experiment

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def dry_run(capsys, *arguments) -> tuple[int, list[str], list[str]]:
    """(exit status, the printed command as argv with its VAR=VALUE prefix, the lines before it)."""
    status = main([*map(str, arguments), "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    return status, shlex.split(lines[-1]), lines[:-1]


@pytest.fixture
def experiment(tmp_path) -> Path:
    return write_experiment(tmp_path, {"train": "/data/never-read-{000000..000003}.tar"})


def test_dry_run_prints_the_exact_pdsh_command_and_exports_without_secrets(tmp_path, experiment, capsys,
                                                                            monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("MY_SETTING", "7")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("PDSH_SSH_ARGS_APPEND", raising=False)
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2")
    status, command, before = dry_run(
        capsys, "pretrain", "--hostfile", hostfile, "--ssh-config", "/etc/cluster_ssh", "--master_port", 29555,
        "--export", "MY_SETTING", "--config", experiment, "--deepspeed_config", "ds.json", "--max-steps", "3",
        "--set", "optim.lr=1e-3")
    assert status == 0
    assert command == [
        f"PYTHONPATH={launch.REPOSITORY}", "DS_ENV_FILE=<private dir>/.deepspeed_env",
        "PDSH_SSH_ARGS_APPEND=-F /etc/cluster_ssh",
        DEEPSPEED, "--hostfile", str(hostfile), "--launcher", "pdsh", "--no_ssh_check", "--master_addr", "127.0.0.1",
        "--master_port", "29555", "--module", "pretrain", "--config", str(experiment), "--deepspeed_config", "ds.json",
        "--max-steps", "3", "--set", "optim.lr=1e-3"]
    exported = before[before.index("# exported to every node through .deepspeed_env:") + 1:-2]
    assert {"DS_ACCELERATOR=cpu", "MY_SETTING=7", "AWS_DEFAULT_REGION=eu-west-1"} <= set(exported)
    assert not any(line.startswith("AWS_SECRET_ACCESS_KEY") for line in exported)
    assert before[-2].startswith("# not sent to the nodes: AWS_SECRET_ACCESS_KEY (a secret on a command line")
    assert "very-secret-value" not in "\n".join(before + command)
    assert before[-1] == "# command:"


def test_dry_run_no_ssh_runs_this_node_only(tmp_path, experiment, capsys):
    hostfile = write_hostfile(tmp_path, "node-a", "node-b")
    status, command, before = dry_run(
        capsys, "pretrain", "--hostfile", hostfile, "--launcher", "no_ssh", "--node_rank", 1, "--master_addr",
        "10.1.2.3", "--config", experiment, "--deepspeed_config", "ds.json")
    assert status == 0
    assert command[command.index(DEEPSPEED):] == [
        DEEPSPEED, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", "1", "--master_addr", "10.1.2.3",
        "--master_port", "29500", "--module", "pretrain", "--config", str(experiment), "--deepspeed_config",
        "ds.json"]
    assert not any(item.startswith("DS_ENV_FILE=") for item in command)
    assert before[0].startswith("# ranks start on this node")


def test_a_lone_remote_host_is_forced_through_pdsh(tmp_path, experiment, capsys):
    hostfile = write_hostfile(tmp_path, "gpu-node-17.invalid")
    status, command, _ = dry_run(capsys, "pretrain", "--hostfile", hostfile, "--master_addr", "10.0.0.17",
                                 "--include", "gpu-node-17.invalid:0", "--config", experiment,
                                 "--deepspeed_config", "ds.json")
    assert status == 0
    assert command[command.index("--include"):command.index("--master_addr")] == [
        "--include", "gpu-node-17.invalid:0", "--launcher", "pdsh", "--no_ssh_check", "--force_multi"]


def test_finetune_runs_the_task_module_with_its_arguments(tmp_path, capsys, monkeypatch):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "toy.py").write_text("")
    monkeypatch.setattr(launch, "REPOSITORY", str(tmp_path))
    config = tmp_path / "toy.yaml"
    config.write_text("task: toy\ndata: {train: 'shards/t-{0..3}.tar', val: s3://b/v.tar}\n")
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2")
    status, command, _ = dry_run(capsys, "finetune", "toy", "--hostfile", hostfile, "--config", config,
                                 "--checkpoint", "runs/x/checkpoints", "--epochs", "1")
    assert status == 0
    assert command[command.index("--module"):] == [
        "--module", "finetune.toy", "--config", str(config), "--checkpoint", "runs/x/checkpoints", "--epochs", "1"]
    found = launch.read_experiment(str(config), ["--output-dir", "runs/toy"])
    assert found.sources == [str(Path.cwd() / "shards/t-{0..3}.tar"), "s3://b/v.tar"]
    assert found.output_dir == "runs/toy"
    assert main(["finetune", "nosuch", "--hostfile", str(hostfile), "--config", str(config), "--dry-run"]) == 2
    assert "no fine-tuning task 'nosuch': expected finetune/nosuch.py" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["--launcher", "no_ssh", "--node_rank", "0"], "--launcher no_ssh needs --master_addr"),
    (["--launcher", "no_ssh", "--master_addr", "10.0.0.1", "--node_rank", "2"],
     "--launcher no_ssh needs --node_rank between 0 and 1"),
    (["--include", "ghost"], "--include 'ghost': host 'ghost' is not in the hostfile"),
    (["--export", "NOT_SET_ANYWHERE_XYZ"], "--export NOT_SET_ANYWHERE_XYZ: NOT_SET_ANYWHERE_XYZ is not set here"),
    (["--export", "WANDB_API_KEY=typed-in-clear"], "--export WANDB_API_KEY=...: a secret's value on a command line"),
    (["--set", "optim.lrr=1"], "unknown key optim.'lrr' in OptimConfig"),
])
def test_bad_options_stop_before_anything_runs(tmp_path, experiment, capsys, arguments, message):
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2")
    status = main(["pretrain", "--hostfile", str(hostfile), *arguments, "--config", str(experiment),
                   "--deepspeed_config", "ds.json", "--dry-run"])
    assert status == 2
    assert message in capsys.readouterr().err
