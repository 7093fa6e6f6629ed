"""``python -m launcher {pretrain,finetune,doctor,hostfile}``: multi-node runs from a hostfile, checked first.

    python -m launcher pretrain --hostfile hostfiles/cluster --config pretrain/configs/albef.yaml \\
        --deepspeed_config ds_configs/zero2_bf16.json [--max-steps N ...]       # doctor, then deepspeed
    python -m launcher finetune retrieval --hostfile hostfiles/cluster --config C --checkpoint P [...]
    python -m launcher doctor --hostfile hostfiles/cluster [--config C]        # one row per host, OK/FAIL
    python -m launcher hostfile --from-slurm [--slots N] [--output FILE]       # inside a SLURM job

Arguments the launcher does not know are passed through to the training module unchanged.
Exit status: the run's, 1 when a host FAILs the doctor, 2 for a bad hostfile, config or option.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from launcher import doctor, launch
from launcher.environment import ExportError, collect_exports
from launcher.hostfile import HostfileError, active_hosts, hostfile_from_slurm, parse_hostfile
from launcher.launch import LaunchError, check_no_ssh, doctor_target, read_experiment

LAUNCHERS = ("pdsh", "openmpi", "slurm", "no_ssh")


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("nodes")
    group.add_argument("--hostfile", required=True, help="DeepSpeed hostfile: one 'HOST slots=N' line per node")
    filters = group.add_mutually_exclusive_group()
    filters.add_argument("--include", default="", help="only these hosts/slots: 'host1@host2:0,1'")
    filters.add_argument("--exclude", default="", help="leave out these hosts/slots: 'host3@host1:7'")
    group.add_argument("--launcher", choices=LAUNCHERS, default="pdsh",
                       help="pdsh (default), openmpi, slurm (srun inside a job), or no_ssh (run this on each node)")
    group.add_argument("--launcher-args", default="", help="extra arguments for pdsh/mpirun/srun, one string")
    group.add_argument("--node_rank", type=int, default=None, help="no_ssh: this node's index among the hosts")
    group.add_argument("--master_addr", default=None, help="address of the first node (default: resolved name)")
    group.add_argument("--master_port", type=int, default=None,
                       help="rendezvous port (default: a free port on the first node; 29500 with no_ssh)")
    group.add_argument("--ssh-port", type=int, default=None, help="sshd port on the nodes (default: ssh's)")
    group.add_argument("--ssh-config", default=None,
                       help="ssh client config file for the doctor and pdsh (ssh -F FILE)")
    group.add_argument("--export", action="append", default=[], metavar="NAME[=VALUE]",
                       help="also export this variable to every node (repeatable); see hostfiles/README.md")
    group.add_argument("--timeout", type=float, default=30.0, help="seconds the doctor waits for each host")
    group.add_argument("--min-free-gb", type=float, default=10.0,
                       help="free disk the output directory needs on every node")


def _run_options(parser: argparse.ArgumentParser, deepspeed_config_required: bool) -> None:
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--deepspeed_config", required=deepspeed_config_required, help="DeepSpeed JSON")
    parser.add_argument("--dry-run", action="store_true", help="print the command and exported variables only")
    parser.add_argument("--skip-doctor", action="store_true", help="start without checking the hosts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launcher", allow_abbrev=False,
                                     description="Multi-node DeepSpeed runs from a hostfile, every node checked first")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="doctor, then deepspeed --module pretrain", allow_abbrev=False)
    _cluster_options(pretrain)
    _run_options(pretrain, deepspeed_config_required=True)
    finetune = commands.add_parser("finetune", help="doctor, then deepspeed --module finetune.TASK",
                                   allow_abbrev=False)
    finetune.add_argument("task", help="fine-tuning task: the module finetune/TASK.py (retrieval, vqa, ...)")
    _cluster_options(finetune)
    _run_options(finetune, deepspeed_config_required=False)
    check = commands.add_parser("doctor", help="check every host of a hostfile", allow_abbrev=False)
    _cluster_options(check)
    check.add_argument("--config", default=None, help="experiment YAML: its shard sources and output directory")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, as for the run")
    check.add_argument("--output-dir", default=None, help="output directory, as for the run")
    hostfile = commands.add_parser("hostfile", help="write a hostfile", allow_abbrev=False)
    hostfile.add_argument("--from-slurm", action="store_true", required=True,
                          help="from SLURM_JOB_NODELIST and the job's GPU count")
    hostfile.add_argument("--slots", type=int, default=None, help="slots per node (default: the job's GPUs)")
    hostfile.add_argument("--output", default=None, help="file to write (default: print)")
    return parser


def run_doctor_command(options: argparse.Namespace) -> int:
    passthrough = [item for value in options.overrides for item in ("--set", value)]
    if options.output_dir:
        passthrough += ["--output-dir", options.output_dir]
    hosts = active_hosts(parse_hostfile(options.hostfile), options.include, options.exclude)
    check_no_ssh(options, hosts, running=False)
    experiment = read_experiment(options.config, passthrough)
    exports = collect_exports(dict(os.environ), options.export)
    port = options.master_port or (29500 if options.launcher == "no_ssh" else None)
    target = doctor_target(options, hosts, experiment, exports, port)
    own = [list(hosts)[options.node_rank]] if options.launcher == "no_ssh" else None
    print(f"hostfile {options.hostfile}: {len(hosts)} host(s), {sum(map(len, hosts.values()))} slot(s); "
          f"checking {'this node' if own else 'every host'} ({target.transport}, {options.timeout:g}s timeout)")
    return 0 if doctor.print_reports(doctor.run_doctor(target, own)) else 1


def write_slurm_hostfile(options: argparse.Namespace) -> int:
    text = hostfile_from_slurm(dict(os.environ), options.slots)
    if options.output:
        with open(options.output, "w") as handle:
            handle.write(text)
        print(f"wrote {options.output}: {len(text.splitlines()) - 1} host(s)", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    options, passthrough = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from pretrain.config import ConfigError

    try:
        if options.command in ("doctor", "hostfile") and passthrough:
            parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
        if options.command == "doctor":
            return run_doctor_command(options)
        if options.command == "hostfile":
            return write_slurm_hostfile(options)
        forward = ["--config", options.config]
        if options.deepspeed_config:
            forward += ["--deepspeed_config", options.deepspeed_config]
        if options.command == "pretrain":
            return launch.launch(options, "pretrain", forward + passthrough, kind="pretrain")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", options.task) or not _finetune_task_exists(options.task):
            raise LaunchError(f"no fine-tuning task {options.task!r}: expected finetune/{options.task}.py "
                              f"(or a package with __main__.py) in this checkout")
        return launch.launch(options, f"finetune.{options.task}", forward + passthrough, kind="finetune")
    except (HostfileError, ExportError, LaunchError, ConfigError) as error:
        print(f"launcher: {error}", file=sys.stderr)
        return 2


def _finetune_task_exists(task: str) -> bool:
    folder = os.path.join(launch.REPOSITORY, "finetune")
    return os.path.isfile(os.path.join(folder, f"{task}.py")) or \
        os.path.isfile(os.path.join(folder, task, "__main__.py"))


if __name__ == "__main__":
    sys.exit(main())
