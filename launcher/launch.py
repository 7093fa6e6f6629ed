"""From launcher options to a checked, running ``deepspeed`` command (``python -m launcher pretrain|finetune``).

``launch(options, module, passthrough)`` parses the hostfile strictly, reads the experiment YAML for
the doctor (shard sources, output directory), runs the doctor on every active host, then starts::

    deepspeed --hostfile F [--include/--exclude S] --launcher pdsh --no_ssh_check \\
        --master_addr A --master_port P --module pretrain --config C --deepspeed_config D [args...]

with ``DS_ENV_FILE`` pointing at a private ``.deepspeed_env`` (see ``launcher/environment.py``), which,
like the runner's own environment, holds no secrets: DeepSpeed copies exports onto the pdsh, mpirun
or srun command line, so each node keeps its own credentials (the launcher names the ones it held back).
``--launcher no_ssh`` instead runs ``deepspeed --no_ssh --node_rank N`` on this node only (start it on
every node yourself); ``--dry-run`` prints the command and the exported environment and starts nothing.
DeepSpeed's own ssh check is switched off because the doctor has already reached every host, with
the same ssh options pdsh gets (``--ssh-config`` becomes ``PDSH_SSH_ARGS_APPEND=-F FILE``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from launcher import doctor
from launcher.environment import (
    Exports,
    MaskingPump,
    collect_exports,
    deepspeed_env_text,
    held_back_note,
    secret_values,
    without_secrets,
    write_deepspeed_env,
)
from launcher.hostfile import active_hosts, parse_hostfile

REPOSITORY = str(Path(__file__).resolve().parents[1])
DEFAULT_MASTER_PORT = 29500
LAUNCHER_TOOLS = {"pdsh": "pdsh", "openmpi": "mpirun", "slurm": "srun"}
SOURCE_KEYS = ("train", "val", "test", "urls", "retrieval_urls")


class LaunchError(ValueError):
    """Options that cannot make a run; the message says which and what to do."""


@dataclass(frozen=True)
class Experiment:
    """What the doctor needs from an experiment YAML."""
    output_dir: str | None
    sources: list[str]
    hdfs_command: str = "hdfs dfs -cat"


def option_values(arguments: list[str], name: str) -> list[str]:
    """Values of ``name VALUE`` / ``name=VALUE`` in a pass-through argument list."""
    values = []
    for index, argument in enumerate(arguments):
        if argument == name and index + 1 < len(arguments):
            values.append(arguments[index + 1])
        elif argument.startswith(name + "="):
            values.append(argument[len(name) + 1:])
    return values


def _absolute_sources(spec: str) -> str:
    """Local shard paths relative to here, made absolute (the probe runs from the checkout)."""
    parts = [part if "://" in part or part.startswith("pipe:") else os.path.abspath(part)
             for part in spec.split("::") if part.strip()]
    return "::".join(parts)


def pretrain_experiment(config_path: str, passthrough: list[str]) -> Experiment:
    from pretrain.config import load_config
    from pretrain.schema import PretrainConfig

    overrides = option_values(passthrough, "--set")
    overrides += [f"run.output_dir={value}" for value in option_values(passthrough, "--output-dir")]
    config = load_config(PretrainConfig, config_path, overrides)
    sources = [source.urls for source in config.data.train]
    if config.eval.retrieval_urls:
        sources.append(config.eval.retrieval_urls)
    return Experiment(config.run.output_dir, [_absolute_sources(spec) for spec in sources],
                      config.data.hdfs_command)


def generic_experiment(config_path: str, passthrough: list[str]) -> Experiment:
    """Any other experiment YAML (fine-tuning): shard URLs under ``data``, ``run.output_dir``."""
    from pretrain.config import ConfigError

    try:
        with open(config_path) as handle:
            tree = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {config_path!r} cannot be read: {error}") from None
    data = tree.get("data") or {}
    sources: list[str] = []
    for key, value in data.items() if isinstance(data, dict) else ():
        if key in SOURCE_KEYS and isinstance(value, str):
            sources.append(value)
        elif key in SOURCE_KEYS and isinstance(value, list):
            sources += [item["urls"] for item in value if isinstance(item, dict) and "urls" in item]
    output_dir = (option_values(passthrough, "--output-dir") or [(tree.get("run") or {}).get("output_dir")])[-1]
    return Experiment(output_dir, [_absolute_sources(spec) for spec in sources],
                      data.get("hdfs_command", "hdfs dfs -cat") if isinstance(data, dict) else "hdfs dfs -cat")


def read_experiment(config_path: str | None, passthrough: list[str], kind: str = "auto") -> Experiment:
    if config_path is None:
        return Experiment(None, [])
    if kind == "auto":
        with open(config_path) as handle:
            tree = yaml.safe_load(handle) or {}
        kind = "finetune" if isinstance(tree, dict) and "task" in tree else "pretrain"
    return pretrain_experiment(config_path, passthrough) if kind == "pretrain" \
        else generic_experiment(config_path, passthrough)


def is_local(host: str) -> bool:
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    if address.startswith("127.") or host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        return address in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


def master_address(options: argparse.Namespace, first_host: str) -> str:
    if options.master_addr:
        return options.master_addr
    try:
        return socket.gethostbyname(first_host)
    except OSError:
        raise LaunchError(f"cannot resolve the first host {first_host!r} to an address; pass --master_addr") from None


def deepspeed_executable() -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def deepspeed_command(options: argparse.Namespace, hosts: dict[str, list[int]], module: str,
                      passthrough: list[str], master_addr: str, master_port: int) -> list[str]:
    command = [*deepspeed_executable(), "--hostfile", os.path.abspath(options.hostfile)]
    if options.include:
        command += ["--include", options.include]
    if options.exclude:
        command += ["--exclude", options.exclude]
    if options.launcher == "no_ssh":
        command += ["--no_ssh", "--node_rank", str(options.node_rank)]
    else:
        command += ["--launcher", options.launcher, "--no_ssh_check"]
        if len(hosts) == 1 and uses_remote_launch(options, hosts):
            command.append("--force_multi")  # DeepSpeed would otherwise run a lone remote host here
        if options.launcher_args:
            command += ["--launcher_args", options.launcher_args]
        if options.ssh_port:
            command += ["--ssh_port", str(options.ssh_port)]
    return command + ["--master_addr", master_addr, "--master_port", str(master_port), "--module", module,
                      *passthrough]


def uses_remote_launch(options: argparse.Namespace, hosts: dict[str, list[int]]) -> bool:
    """Whether DeepSpeed goes through pdsh/mpirun/srun (and reads .deepspeed_env) or starts ranks here."""
    return options.launcher != "no_ssh" and (len(hosts) > 1 or not is_local(next(iter(hosts))))


def check_launcher_tool(options: argparse.Namespace) -> None:
    tool = LAUNCHER_TOOLS.get(options.launcher)
    if tool and not shutil.which(tool):
        fix = "apt-get install pdsh" if tool == "pdsh" else "install it, or pick another --launcher"
        raise LaunchError(f"--launcher {options.launcher} needs `{tool}` on this machine, and it is not installed "
                          f"({fix})")


def runner_environment(options: argparse.Namespace, env_file: str | None) -> dict[str, str]:
    """What the deepspeed runner process gets beyond this shell's environment."""
    extra = {"PYTHONPATH": os.pathsep.join(filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")]))}
    if env_file:
        extra["DS_ENV_FILE"] = env_file  # absolute: DeepSpeed reads only this file, not ~ or ./.deepspeed_env
    if options.ssh_config:
        extra["PDSH_SSH_ARGS_APPEND"] = f"{os.environ.get('PDSH_SSH_ARGS_APPEND', '')} -F {options.ssh_config}".strip()
    return extra


def doctor_target(options: argparse.Namespace, hosts: dict[str, list[int]], experiment: Experiment,
                  exports: Exports, master_port: int | None) -> doctor.Target:
    transport = {"no_ssh": "local", "slurm": "srun"}.get(options.launcher) or \
        ("ssh" if uses_remote_launch(options, hosts) else "local")  # a lone local host: DeepSpeed starts it here
    output_dir = experiment.output_dir and os.path.abspath(experiment.output_dir)
    return doctor.Target(hosts=dict(hosts), workdir=os.getcwd(), repository=REPOSITORY, python=sys.executable,
                         transport=transport, exports=exports.sent, required_secrets=exports.required,
                         output_dir=output_dir, sources=experiment.sources,
                         hdfs_command=experiment.hdfs_command, master_port=master_port, ssh_port=options.ssh_port,
                         ssh_config=options.ssh_config, timeout_s=options.timeout, min_free_gb=options.min_free_gb)


def check_no_ssh(options: argparse.Namespace, hosts: dict[str, list[int]], running: bool = True) -> None:
    if options.launcher != "no_ssh":
        return
    if running and not options.master_addr:
        raise LaunchError("--launcher no_ssh needs --master_addr (the address of node rank 0), or DeepSpeed "
                          "falls back to ssh to find it")
    if options.node_rank is None or not 0 <= options.node_rank < len(hosts):
        raise LaunchError(f"--launcher no_ssh needs --node_rank between 0 and {len(hosts) - 1} (this node's line "
                          f"among the active hosts of {options.hostfile})")


def print_dry_run(command: list[str], exports: Exports, extra_env: dict[str, str], remote: bool,
                  port_chosen: bool) -> None:
    if not port_chosen:
        print(f"# --master_port {DEFAULT_MASTER_PORT} shown: a real run takes a free port the doctor finds on the "
              f"first node (pass --master_port to fix one)")
    if remote:
        print("# exported to every node through .deepspeed_env:")
        print(deepspeed_env_text(exports.sent), end="")
        note = held_back_note(exports)
        if note:
            print(f"# {note}")
    else:
        print("# ranks start on this node and inherit this shell's environment (no .deepspeed_env)")
    print("# command:")
    prefix = " ".join(f"{name}={shlex.quote(value)}" for name, value in extra_env.items())
    print(f"{prefix} {shlex.join(command)}".strip())


def run_process(command: list[str], env: dict[str, str], secrets: list[str]) -> int:
    """Run deepspeed; with secrets set here its output passes through a masking filter (ranks started on
    this machine inherit them, and a rank may print its environment)."""
    pipe = subprocess.PIPE if secrets else None
    process = subprocess.Popen(command, env=env, stdout=pipe, stderr=pipe)
    pumps = []
    if secrets:
        pumps = [MaskingPump(process.stdout, sys.stdout.buffer, secrets),
                 MaskingPump(process.stderr, sys.stderr.buffer, secrets)]
        for pump in pumps:
            pump.start()
    previous = signal.signal(signal.SIGTERM, lambda *_: process.terminate())  # DeepSpeed then stops the nodes
    try:
        returncode = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        returncode = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
        pump.join()
    return returncode


def launch(options: argparse.Namespace, module: str, passthrough: list[str], kind: str) -> int:
    hosts = active_hosts(parse_hostfile(options.hostfile), options.include, options.exclude)
    check_no_ssh(options, hosts)
    experiment = read_experiment(options.config, passthrough, kind)
    exports = collect_exports(dict(os.environ), options.export)
    first_host = next(iter(hosts))
    master_addr = master_address(options, first_host)
    master_port = options.master_port
    if options.launcher == "no_ssh" and master_port is None:
        master_port = DEFAULT_MASTER_PORT  # every node must agree without talking to each other

    remote = uses_remote_launch(options, hosts)
    if remote and not options.dry_run:
        check_launcher_tool(options)
    if not options.dry_run and not options.skip_doctor:
        target = doctor_target(options, hosts, experiment, exports, master_port)
        own = [list(hosts)[options.node_rank]] if options.launcher == "no_ssh" else None
        reports = doctor.run_doctor(target, own)
        if not doctor.print_reports(reports, sys.stderr):
            print("launcher: not starting the run; fix the hosts above (or --skip-doctor to start anyway)",
                  file=sys.stderr)
            return 1
        master_port = master_port or reports[0].port
    master_port = master_port or DEFAULT_MASTER_PORT

    command = deepspeed_command(options, hosts, module, passthrough, master_addr, master_port)
    if options.dry_run:
        extra = runner_environment(options, "<private dir>/.deepspeed_env" if remote else None)
        print_dry_run(command, exports, extra, remote, port_chosen=options.master_port is not None
                      or options.launcher == "no_ssh")
        return 0
    with tempfile.TemporaryDirectory(prefix="launcher-") as private:  # mode 0700
        env_file = write_deepspeed_env(os.path.join(private, ".deepspeed_env"), exports.sent) if remote else None
        env = {**os.environ, **runner_environment(options, env_file)}
        if remote:  # DeepSpeed's runner copies PYTHON*, MLFLOW*, NCCL*... variables onto the command line itself
            env = without_secrets(env)
            note = held_back_note(exports)
            if note:
                print(f"launcher: {note}", file=sys.stderr)
        print(f"launcher: {shlex.join(command)}", file=sys.stderr, flush=True)
        return run_process(command, env, secret_values(exports.held_back))
