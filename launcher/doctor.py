"""Preflight checks of every node of a run: ``python -m launcher doctor --hostfile F [--config C] ...``.

DeepSpeed's runner tests ssh to the first host only; a node with another library version, an old
checkout, too few GPUs, a full disk or no access to the shards shows up an hour later as a hung
collective. The doctor asks every active host at once (``launcher/probe.py`` over ssh with a
timeout; srun under ``--launcher slurm``; this machine only under ``no_ssh``), compares the answers
with the launching host, checks that each node holds the credentials the run needs (AWS for
``s3://`` sources, the secrets named with ``--export``: a remote launch sends none from here), and
prints one row per host::

    HOST       SLOTS  STATUS  DETAILS
    127.0.0.1  1      OK      python 3.11.9, deepspeed 0.19.8, rev 26d4807, CPU mode, 57 GiB free, ...
    127.0.0.3  1      FAIL    ssh: connect to host 127.0.0.3 port 2222: Connection refused -> ...

A host that cannot be reached FAILs within the timeout; any FAIL makes the command exit 1.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from launcher import probe
from launcher.environment import without_secrets

EXIT_NO_WORKDIR, EXIT_NO_CHECKOUT, EXIT_NO_PYTHON = 201, 202, 203
GIB = 1024 ** 3


@dataclass
class Target:
    """What to check and how to reach the hosts."""
    hosts: dict[str, list[int]]              # active host -> slot ids, in rank order
    workdir: str                             # where deepspeed will `cd` on every node
    repository: str                          # this checkout (the probe runs from it)
    python: str                              # the interpreter deepspeed will start on every node
    transport: str = "ssh"                   # ssh | srun (inside a SLURM job) | local (this machine)
    exports: dict[str, str] = field(default_factory=dict)   # what .deepspeed_env sends: never a secret
    required_secrets: tuple[str, ...] = ()   # --export names of secrets: each node must hold them itself
    output_dir: str | None = None
    sources: list[str] = field(default_factory=list)
    hdfs_command: str = "hdfs dfs -cat"
    master_port: int | None = None           # None: the first host proposes a free one
    ssh_port: int | None = None
    ssh_config: str | None = None
    timeout_s: float = 30.0
    min_free_gb: float = 10.0


@dataclass
class HostReport:
    host: str
    slots: int
    problems: list[str] = field(default_factory=list)
    summary: str = ""
    port: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def remote_command(target: Target) -> str:
    quote = shlex.quote
    return (f"cd {quote(target.workdir)} 2>/dev/null || exit {EXIT_NO_WORKDIR}; "
            f"test -f {quote(target.repository)}/launcher/probe.py || exit {EXIT_NO_CHECKOUT}; "
            f"test -x {quote(target.python)} || exit {EXIT_NO_PYTHON}; "
            f"cd {quote(target.repository)} && exec {quote(target.python)} -m launcher.probe")


def transport(target: Target, host: str) -> list[str]:
    """The command that runs the probe on ``host``."""
    command = remote_command(target)
    if target.transport == "local":
        return ["bash", "-c", command]
    if target.transport == "srun":
        return ["srun", "--nodes=1", "--ntasks=1", "--overlap", f"--nodelist={host}", "bash", "-c", command]
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(min(10, target.timeout_s)))}"]
    if target.ssh_config:
        ssh += ["-F", target.ssh_config]
    if target.ssh_port:
        ssh += ["-p", str(target.ssh_port)]
    return [*ssh, host, command]


def _failure(target: Target, host: str, returncode: int, stderr: str) -> str:
    last = (stderr.strip().splitlines() or [""])[-1]
    if returncode == EXIT_NO_WORKDIR:
        return f"no directory {target.workdir} on {host}: deepspeed runs every node from the same path; create " \
               f"it (same checkout, same layout)"
    if returncode == EXIT_NO_CHECKOUT:
        return f"no checkout at {target.repository} on {host}: clone this repository at the same path"
    if returncode == EXIT_NO_PYTHON:
        return f"no {target.python} on {host}: run `make setup` there (same path as here)"
    if target.transport == "ssh" and returncode == 255:
        reason = last.removeprefix("ssh: ") or "connection failed"
        return f"ssh: {reason} -> set up passwordless ssh to {host} (ssh-copy-id), check the name and that " \
               f"sshd runs there"
    return f"probe failed ({returncode}): {last or 'no output'}"


def ask(target: Target, host: str, request: dict) -> tuple[dict | None, str | None]:
    """(answer, None) or (None, the reason it failed)."""
    # srun forwards its whole environment to the probe, as it does to the ranks, which get no secrets from
    # here; a local probe inherits them, as local ranks do.
    env = None if target.transport == "local" else without_secrets(dict(os.environ))
    try:  # its own process group, so that a timeout stops whatever the command started
        process = subprocess.Popen(transport(target, host), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    except FileNotFoundError as error:
        return None, f"{error.filename} is not installed here"
    try:
        stdout, stderr = process.communicate(json.dumps(request), timeout=target.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, f"no answer within {target.timeout_s:g}s -> check that {host} is up and reachable " \
                     f"(or raise --timeout)"
    if process.returncode != 0:
        return None, _failure(target, host, process.returncode, stderr)
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line), None
        except json.JSONDecodeError:
            continue
    return None, f"probe gave no answer: {stdout.strip()[-200:] or stderr.strip()[-200:]}"


def compare(reference: dict, answer: dict, host: str, slots: int, target: Target) -> list[str]:
    """Every difference from the launching host, each with what to do."""
    problems = []
    if answer["python"] != reference["python"]:
        problems.append(f"python {answer['python']} (here {reference['python']}) -> install Python "
                        f"{reference['python']} and run `make setup` on {host}")
    for name, version in reference["packages"].items():
        theirs = answer["packages"].get(name)
        if theirs != version:
            problems.append(f"{name} {theirs or 'missing'} (here {version or 'missing'}) -> "
                            f"`pip install -r requirements.txt` in {target.python} on {host}")
    mine, theirs = reference["revision"], answer["revision"]
    if mine["commit"] != theirs["commit"]:
        problems.append(f"code at {str(theirs['commit'])[:10]} (here {str(mine['commit'])[:10]}) -> "
                        f"`git checkout {mine['commit']}` on {host}")
    elif mine["changes"] != theirs["changes"]:
        problems.append(f"uncommitted changes differ from here -> sync the working tree to {host} "
                        f"(commit and pull, or rsync)")
    accel = answer["accelerators"]
    if accel["mode"] == "error":
        problems.append(f"torch fails to import: {accel['error']} -> reinstall with `make setup` on {host}")
    elif accel["mode"] == "cuda" and accel["count"] < slots:
        fix = (f"set DS_ACCELERATOR=cpu for CPU ranks, or check `nvidia-smi` on {host}" if accel["count"] == 0
               else f"lower slots to {accel['count']} for {host} in the hostfile")
        problems.append(f"{accel['count']} GPU(s) < slots={slots} -> {fix}")
    space = answer["disk"]
    if not space["writable"]:
        problems.append(f"cannot write under {space['checked']} (output {space['path']}) -> fix permissions "
                        f"or set run.output_dir")
    elif space["free_bytes"] < target.min_free_gb * GIB:
        problems.append(f"{space['free_bytes'] / GIB:.1f} GiB free under {space['checked']} (< "
                        f"{target.min_free_gb:g} GiB) -> free space or point run.output_dir elsewhere")
    problems += credential_problems(answer, host, target)
    for source in answer["sources"]:
        if source["ok"] is False:  # None: not tried, for want of the credentials reported above
            problems.append(f"cannot read shard {source['url']}: {source['detail']} -> check the path, mounts "
                            f"and credentials on {host}")
    port = answer.get("port")
    if port and not port["free"]:
        problems.append(f"master port {port['port']} is in use on {host} -> pass --master_port with a free "
                        f"port, or stop what holds it")
    return problems


def where_secrets_come_from(name: str, host: str, transport: str) -> str:
    if transport == "local":
        return f"`export {name}=...` in this shell (ranks started here inherit it)"
    if transport == "srun":
        return (f"have the tool read it from its own file on {host}, or set it for job steps there (a SLURM "
                f"TaskProlog); srun gets no secrets from here")
    return (f"set it where commands run over ssh see it on {host}: `export {name}=...` at the top of ~/.bashrc, "
            f"or in a mode-0600 file sourced from there; secrets are not sent from here")


def credential_problems(answer: dict, host: str, target: Target) -> list[str]:
    """What the node lacks of the credentials the run needs; names and files only, never values."""
    problems = []
    credentials = answer.get("aws_credentials")
    if credentials and not credentials["found"]:
        url = next(source["url"] for source in answer["sources"] if "s3://" in source["url"])
        problems.append(f"no AWS credentials on {host} for {url} ({credentials['detail']}) -> write them to "
                        f"~/.aws/credentials on {host} (`aws configure`, mode 0600; AWS_PROFILE picks a profile) "
                        f"or give {host} an instance role; AWS keys set here are not sent to the nodes")
    elif credentials and credentials.get("private") is False:
        problems.append(f"{credentials['file']} on {host} can be read by other users (mode {credentials['mode']}) "
                        f"-> `chmod 600 {credentials['file']}` on {host}")
    for name, present in answer.get("secrets", {}).items():
        if not present:
            problems.append(f"{name} is not set on {host} (the run needs it: --export {name}) -> "
                            f"{where_secrets_come_from(name, host, target.transport)}")
    return problems


def summarize(answer: dict) -> str:
    accel = answer["accelerators"]
    revision = answer["revision"]
    parts = [f"python {answer['python']}", f"deepspeed {answer['packages'].get('deepspeed')}",
             f"rev {str(revision['commit'])[:7]}{'+changes' if revision['changes'] else ''}",
             "CPU mode" if accel["mode"] == "cpu" else f"{accel['count']} GPU(s)",
             f"{answer['disk']['free_bytes'] / GIB:.0f} GiB free"]
    credentials = answer.get("aws_credentials") or {}
    if credentials.get("found"):
        parts.append(f"AWS credentials ({credentials['method']})")
    present = [name for name, found in answer.get("secrets", {}).items() if found]
    if present:
        parts.append(f"{', '.join(present)} set")
    if answer["sources"]:
        parts.append(f"{len(answer['sources'])} shard source(s) readable")
    if answer.get("port"):
        parts.append(f"port {answer['port']['port']} free")
    return ", ".join(parts)


def check_host(target: Target, reference: dict, host: str, first: bool) -> HostReport:
    slots = len(target.hosts[host])
    request = {"env": target.exports, "output_dir": target.output_dir, "sources": target.sources,
               "hdfs_command": target.hdfs_command, "source_timeout_s": max(1.0, target.timeout_s * 0.6),
               "required_secrets": list(target.required_secrets)}
    if first:
        request.update(port=target.master_port, find_port=target.master_port is None)
    answer, failure = ask(target, host, request)
    if answer is None:
        return HostReport(host, slots, [failure])
    report = HostReport(host, slots, compare(reference, answer, host, slots, target), summarize(answer))
    if first and answer.get("port"):
        report.port = answer["port"]["port"]
    return report


def run_doctor(target: Target, hosts: list[str] | None = None) -> list[HostReport]:
    """Check ``hosts`` (default: all active hosts) concurrently; the first active host is the master."""
    reference = probe.local_facts()
    first_host = next(iter(target.hosts))
    names = hosts or list(target.hosts)
    with ThreadPoolExecutor(max_workers=min(64, len(names))) as pool:
        futures = [pool.submit(check_host, target, reference, host, host == first_host) for host in names]
        return [future.result() for future in futures]


def format_table(reports: list[HostReport]) -> str:
    host_width = max(4, *(len(report.host) for report in reports))
    rows = [f"{'HOST':<{host_width}}  SLOTS  STATUS  DETAILS"]
    indent = " " * (host_width + 17)
    for report in reports:
        lines = report.problems or [report.summary]
        status = "OK" if report.ok else "FAIL"
        rows.append(f"{report.host:<{host_width}}  {report.slots:<5}  {status:<6}  {lines[0]}")
        rows.extend(indent + line for line in lines[1:])
    return "\n".join(rows)


def print_reports(reports: list[HostReport], stream=None) -> bool:
    """Print the table; True when every host is OK."""
    stream = stream or sys.stdout
    failed = [report.host for report in reports if not report.ok]
    print(format_table(reports), file=stream)
    if failed:
        print(f"doctor: {len(failed)} of {len(reports)} host(s) FAIL ({', '.join(failed)}); fix them or leave "
              f"them out with --exclude", file=stream)
    else:
        print(f"doctor: all {len(reports)} host(s) OK", file=stream)
    stream.flush()
    return not failed
