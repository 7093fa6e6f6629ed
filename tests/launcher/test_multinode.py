"""Real multi-node runs on one machine: two "nodes" (127.0.0.1 and 127.0.0.2) train the tiny model on CPU.

Pins: ``python -m launcher pretrain`` over pdsh and ssh (a private sshd on port 2222) and with
``--launcher no_ssh`` (one launcher per node rank) gives the same losses as one node with two ranks,
every node writes its part of the checkpoint, the exported variables reach the remote ranks, a secret
set in the launching shell appears on no process's command line and in no output while it runs; the
doctor FAILs a host without sshd within seconds, and a host without its own credentials (AWS for an
``s3://`` source, a secret named with ``--export``) by name, while the host that has them passes.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid

import pytest

from data_shards.storage import expand_urls
from tests.launcher.conftest import NODE_SECRET, REPO, launcher_command, launcher_env, run_launcher, write_hostfile
from tests.pretrain.conftest import free_port, logged_steps, run_pretrain, write_ds_config, write_experiment

pytestmark = pytest.mark.slow

STEPS = 3
SECRET = "s3cr3t-value-xyz"
# DeepSpeed's runner copies MLFLOW* variables onto the pdsh command line by itself, .deepspeed_env or not.
RUNNER_SECRET = "mlflow-pass-5b1e0d"
# The same ranks, seeds and data on one node or two: equal losses (gloo sums the two gradients alike).
LOSS_TOLERANCE = 1e-6
RUN_ARGUMENTS = ("--min-free-gb", "0.1", "--max-steps", str(STEPS))


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory, tiny_shards) -> list[float]:
    """The reference: one node, two ranks, ZeRO-1 (each rank owns half of the optimizer state)."""
    directory = tmp_path_factory.mktemp("one_node")
    run_pretrain(write_experiment(directory, tiny_shards), write_ds_config(directory, "zero1_fp32.json"),
                 ranks=2, extra=["--max-steps", str(STEPS)])
    return [logged_steps(directory / "run")[step]["loss"] for step in range(1, STEPS + 1)]


def assert_two_nodes_trained(run_dir, one_node_losses) -> None:
    steps = logged_steps(run_dir)
    assert [steps[step]["loss"] for step in range(1, STEPS + 1)] == pytest.approx(one_node_losses,
                                                                                  abs=LOSS_TOLERANCE)
    checkpoint = run_dir / "checkpoints" / f"global_step{STEPS}"
    for rank in (0, 1):  # rank 0 runs on 127.0.0.1, rank 1 on 127.0.0.2
        assert (checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (checkpoint / f"client_rank{rank:03d}.pt").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"global_step{STEPS}"


class CommandLineWatch(threading.Thread):
    """Reads every process's command line (``/proc/PID/cmdline``, what ``ps`` shows any user) again and
    again while a run goes on, and keeps those that hold one of ``values``."""

    def __init__(self, *values: str):
        super().__init__(daemon=True)
        self.values = [value.encode() for value in values]
        self.leaks: list[str] = []
        self.pdsh_seen = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"{entry.path}/cmdline", "rb") as handle:
                        command_line = handle.read()
                except OSError:  # the process ended between listing and reading
                    continue
                self.pdsh_seen |= command_line.startswith(b"pdsh\0")
                if any(value in command_line for value in self.values):
                    self.leaks.append(command_line.replace(b"\0", b" ").decode(errors="replace")[:400])
            time.sleep(0.05)

    def __enter__(self) -> CommandLineWatch:
        self.start()
        return self

    def __exit__(self, *_) -> None:
        self.done.set()
        self.join()


def test_two_nodes_over_pdsh_and_ssh_match_one_node(tmp_path, tiny_shards, sshd, one_node_losses):
    experiment = write_experiment(tmp_path, tiny_shards)
    ds_config = write_ds_config(tmp_path, "zero1_fp32.json")
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2")
    env = launcher_env(AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1",
                       MLFLOW_TRACKING_PASSWORD=RUNNER_SECRET)
    with CommandLineWatch(SECRET, RUNNER_SECRET) as watch:
        result = run_launcher("pretrain", "--hostfile", hostfile, "--ssh-config", sshd.config, "--config", experiment,
                              "--deepspeed_config", ds_config, *RUN_ARGUMENTS, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    doctor_rows = [line.split()[:3] for line in output.splitlines() if line.startswith("127.0.0.")]
    assert ["127.0.0.1", "1", "OK"] in doctor_rows and ["127.0.0.2", "1", "OK"] in doctor_rows
    assert "127.0.0.2: " in output and "nnodes=2, num_local_procs=1, node_rank=1" in output  # pdsh's prefix
    assert watch.pdsh_seen, "the watch never saw pdsh running, so it proves nothing"
    assert watch.leaks == []
    assert SECRET not in output and RUNNER_SECRET not in output
    assert "launcher: not sent to the nodes: AWS_SECRET_ACCESS_KEY (" in output
    (pdsh_command,) = [line for line in output.splitlines() if "cmd = pdsh" in line]  # DeepSpeed logs it
    assert "AWS_SECRET_ACCESS_KEY" not in pdsh_command and "MLFLOW_TRACKING_PASSWORD" not in pdsh_command
    assert "export AWS_DEFAULT_REGION=us-east-1; " in pdsh_command  # settings still reach the nodes
    assert_two_nodes_trained(tmp_path / "run", one_node_losses)
    notes = (tmp_path / "run" / "logs" / "metrics.jsonl").read_text()
    # OMP_NUM_THREADS reached the ranks that ssh started only through .deepspeed_env; without it rank 0
    # would have picked its own thread count and said so.
    assert "torch thread(s) per rank" not in notes


def test_two_nodes_with_no_ssh_match_one_node(tmp_path, tiny_shards, one_node_losses):
    experiment = write_experiment(tmp_path, tiny_shards)
    ds_config = write_ds_config(tmp_path, "zero1_fp32.json")
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2")
    port = free_port()
    nodes = [subprocess.Popen(launcher_command("pretrain", "--hostfile", hostfile, "--launcher", "no_ssh",
                                               "--node_rank", rank, "--master_addr", "127.0.0.1", "--master_port",
                                               port, "--config", experiment, "--deepspeed_config", ds_config,
                                               *RUN_ARGUMENTS),
                              cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, output[-6000:]
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in output
        own_host = f"127.0.0.{rank + 1}"
        assert [line.split()[:3] for line in output.splitlines() if line.startswith("127.0.0.")] == [
            [own_host, "1", "OK"]]  # each node checks itself only
    assert_two_nodes_trained(tmp_path / "run", one_node_losses)


def test_doctor_fails_a_host_without_sshd_quickly(tmp_path, tiny_shards, sshd):
    experiment = write_experiment(tmp_path, tiny_shards)
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2", "127.0.0.3")
    started = time.monotonic()
    result = run_launcher("doctor", "--hostfile", hostfile, "--ssh-config", sshd.config, "--config", experiment,
                          "--min-free-gb", "0.1", "--timeout", "20", timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("127.0.0.")}
    assert rows["127.0.0.1"].split()[1:3] == ["1", "OK"] and "port " in rows["127.0.0.1"]
    assert rows["127.0.0.2"].split()[1:3] == ["1", "OK"] and "1 shard source(s) readable" in rows["127.0.0.2"]
    assert rows["127.0.0.3"].split()[1:3] == ["1", "FAIL"]
    assert "ssh: connect to host 127.0.0.3 port 2222: Connection refused -> set up passwordless ssh to " \
           "127.0.0.3" in rows["127.0.0.3"]
    assert result.stdout.splitlines()[-1].startswith("doctor: 1 of 3 host(s) FAIL (127.0.0.3)")
    assert elapsed < 15  # connection refused: seconds, not the 20 s timeout


def test_doctor_passes_the_node_with_its_own_credentials_and_names_what_the_other_lacks(tmp_path, tiny_shards, sshd,
                                                                                         moto_endpoint):
    import boto3

    bucket = f"doctor-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket=bucket)
    client.upload_file(expand_urls(tiny_shards["train"])[0], bucket, "train-000000.tar")
    experiment = write_experiment(tmp_path, {"train": f"s3://{bucket}/train-{{000000..000000}}.tar"})
    credentials = sshd.aws_directory("127.0.0.1") / "credentials"  # 127.0.0.2 keeps none
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    credentials.chmod(0o600)
    hostfile = write_hostfile(tmp_path, "127.0.0.1", "127.0.0.2")
    # The launching shell holds keys of its own: they must stay here, so 127.0.0.2 cannot borrow them.
    env = launcher_env(AWS_ENDPOINT_URL=moto_endpoint, AWS_DEFAULT_REGION="us-east-1", AWS_ACCESS_KEY_ID="testing",
                       AWS_SECRET_ACCESS_KEY=SECRET)
    for name in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)  # each node's own files decide
    name, value = NODE_SECRET
    with CommandLineWatch(SECRET, value) as watch:
        result = run_launcher("doctor", "--hostfile", hostfile, "--ssh-config", sshd.config, "--config", experiment,
                              "--export", name, "--min-free-gb", "0.1", env=env, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("127.0.0.")}
    assert rows["127.0.0.1"].split()[1:3] == ["1", "OK"], output
    assert f"AWS credentials (shared-credentials-file), {name} set, 1 shard source(s) readable" in rows["127.0.0.1"]
    assert rows["127.0.0.2"].split()[1:3] == ["1", "FAIL"], output
    failure = result.stdout[result.stdout.index("127.0.0.2 "):]
    assert f"no AWS credentials on 127.0.0.2 for s3://{bucket}/train-{{000000..000000}}.tar (none in the " \
           f"environment, ~/.aws or an instance role) -> write them to ~/.aws/credentials on 127.0.0.2" in failure
    assert f"{name} is not set on 127.0.0.2 (the run needs it: --export {name}) -> set it where commands run over " \
           f"ssh see it on 127.0.0.2" in failure
    assert "cannot read shard" not in failure  # the missing credentials are the whole story
    assert result.stdout.splitlines()[-1].startswith("doctor: 1 of 2 host(s) FAIL (127.0.0.2)")
    assert SECRET not in output and value not in output
    assert watch.leaks == []
