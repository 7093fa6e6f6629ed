"""Fixtures for launcher tests: a private sshd on 127.0.0.1:2222 (and 127.0.0.2), and launcher runners.

``sshd`` starts ``/usr/sbin/sshd`` once per session with its own host key, config and authorized
client key in a temporary directory, and yields the ssh client config that reaches it (``ssh -F``;
the launcher hands the same file to pdsh). Nothing in the user's ``~/.ssh`` is read or written. The
tests that need it skip, with the reason, when openssh-server or pdsh is not installed (``make setup``
installs both when it runs as root).

Each loopback "node" also gets what a real machine keeps for itself, set by sshd for the sessions
that reach that address: its own AWS files (``SshServer.aws_directory(node)``, empty until a test
writes ``credentials`` there), and on 127.0.0.1 only, ``NODE_API_TOKEN`` in its environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pretrain.conftest import REPO, tiny_shards  # noqa: F401  (the shared shard fixture)

SSH_PORT = 2222
LOOPBACK_NODES = ("127.0.0.1", "127.0.0.2")
NODE_SECRET = ("NODE_API_TOKEN", "node-own-token-3e9d")  # in 127.0.0.1's own environment only


@dataclass(frozen=True)
class SshServer:
    config: Path          # ssh client config: ssh -F config 127.0.0.1 reaches the server
    directory: Path

    def aws_directory(self, node: str) -> Path:
        """The node's own ~/.aws: ssh sessions to ``node`` read credentials and config from here."""
        return self.directory / "nodes" / node / "aws"


def missing_ssh_tools() -> str | None:
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    missing = [name for name, found in (("openssh-server (sshd)", sshd), ("openssh-client (ssh)", shutil.which("ssh")),
                                        ("ssh-keygen", shutil.which("ssh-keygen")), ("pdsh", shutil.which("pdsh")))
               if not found]
    if missing:
        return f"{', '.join(missing)} not installed; `make setup` as root installs openssh-server and pdsh"
    return None


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _write_server_files(directory: Path) -> Path:
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    listen = "".join(f"ListenAddress {node}\n" for node in LOOPBACK_NODES)
    # Both addresses share one file system; the per-address environment is what tells the nodes apart.
    per_node = ""
    for node in LOOPBACK_NODES:
        aws = directory / "nodes" / node / "aws"
        aws.mkdir(parents=True)
        secret = f" {NODE_SECRET[0]}={NODE_SECRET[1]}" if node == LOOPBACK_NODES[0] else ""
        per_node += (f"Match LocalAddress {node}\n"
                     f"  SetEnv AWS_SHARED_CREDENTIALS_FILE={aws / 'credentials'} AWS_CONFIG_FILE={aws / 'config'}"
                     f"{secret}\n")
    (directory / "sshd_config").write_text(
        f"Port {SSH_PORT}\n{listen}HostKey {directory / 'host_key'}\nPidFile {directory / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"StrictModes no\nPermitRootLogin prohibit-password\n{per_node}")
    host_key = " ".join((directory / "host_key.pub").read_text().split()[:2])
    (directory / "known_hosts").write_text("".join(f"[{node}]:{SSH_PORT} {host_key}\n" for node in LOOPBACK_NODES))
    client = directory / "ssh_config"
    client.write_text(
        "Host 127.0.0.1 127.0.0.2 127.0.0.3\n"
        f"  Port {SSH_PORT}\n  IdentityFile {directory / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {directory / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n  ConnectTimeout 5\n  LogLevel ERROR\n")
    return client


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    reason = missing_ssh_tools()
    if reason:
        pytest.skip(reason)
    if any(_port_open(node, SSH_PORT) for node in LOOPBACK_NODES):
        pytest.fail(f"port {SSH_PORT} on loopback is taken; stop what listens there (the multi-node tests "
                    f"start their own sshd on it)")
    directory = tmp_path_factory.mktemp("sshd")
    client_config = _write_server_files(directory)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd_binary = shutil.which("sshd") or "/usr/sbin/sshd"
    with open(directory / "sshd.log", "w") as log:  # sshd keeps its own copy of the descriptor
        process = subprocess.Popen([sshd_binary, "-D", "-e", "-f", str(directory / "sshd_config")],
                                   stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 15
    while not all(_port_open(node, SSH_PORT) for node in LOOPBACK_NODES):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail(f"sshd did not start: {(directory / 'sshd.log').read_text()[-2000:]}")
        time.sleep(0.1)
    check = subprocess.run(["ssh", "-F", str(client_config), "127.0.0.2", "true"], capture_output=True, text=True)
    if check.returncode != 0:
        process.kill()
        pytest.fail(f"ssh to the test sshd failed: {check.stderr}\n{(directory / 'sshd.log').read_text()[-2000:]}")
    yield SshServer(client_config, directory)
    process.terminate()
    process.wait(timeout=10)


def launcher_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    for name in ("PDSH_SSH_ARGS_APPEND", "DS_ENV_FILE", "PDSH_RCMD_TYPE"):
        env.pop(name, None)
    return env


def launcher_command(*arguments) -> list[str]:
    return [sys.executable, "-m", "launcher", *map(str, arguments)]


def run_launcher(*arguments, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(launcher_command(*arguments), cwd=REPO, env=env or launcher_env(), capture_output=True,
                          text=True, timeout=timeout)


def write_hostfile(directory: Path, *nodes: str, name: str = "hostfile") -> Path:
    path = directory / name
    path.write_text("".join(f"{node} slots=1\n" for node in nodes))
    return path
