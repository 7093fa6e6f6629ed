"""Hostfiles: strict parsing with line numbers and fixes, ``--include``/``--exclude`` filters, SLURM node lists.

A hostfile is DeepSpeed's format, one node per line, in rank order::

    # comments and blank lines are skipped
    worker-0 slots=8
    worker-1 slots=8   # a trailing comment is fine

``parse_hostfile(path)`` returns the hosts or raises :class:`HostfileError` listing every bad line with
its number and the fix (DeepSpeed itself stops at the first bad line, and a missing hostfile only makes
it warn and fall back to the local machine). ``active_hosts`` applies DeepSpeed's filter syntax
``NAME[:SLOT,SLOT]@NAME...`` so the doctor checks exactly the nodes a run will use.
``python -m launcher hostfile --from-slurm`` uses ``expand_nodelist`` and ``slurm_slots``::

    expand_nodelist("gpu[01-03,07],login1")   # ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1']
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

LINE_PATTERN = re.compile(r"^(?P<host>\S+)(?:\s+(?P<rest>.*))?$")
SLOTS_PATTERN = re.compile(r"^slots=(?P<slots>\S*)$")
HOST_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?$")
EXAMPLE_LINE = "worker-0 slots=8"


class HostfileError(ValueError):
    """A hostfile that cannot be used; the message lists each problem with its line number and fix."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int
    line: int


def host_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a hostfile host (None when it can)."""
    for separator, role in (("@", "separates hosts in --include/--exclude"), (":", "starts a slot list"),
                            (",", "separates hosts in pdsh's -w list")):
        if separator in name:
            return f"'{separator}' {role}; write the bare host name or address"
    try:
        ipaddress.IPv4Address(name)
        return None
    except ValueError:
        pass
    if len(name) > 253 or not all(HOST_LABEL.match(label) for label in name.split(".")):
        return "not a host name (letters, digits, '-', '_' and '.' only, starting and ending with a letter or digit)"
    return None


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts in file order; every bad line is reported at once in one :class:`HostfileError`."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = LINE_PATTERN.match(line)
        host, rest = match.group("host"), (match.group("rest") or "").strip()
        where = f"{source} line {number}: {raw.strip()!r}"
        if host.startswith("slots="):
            problems.append(f"{where}: the host name is missing; write '{EXAMPLE_LINE}'")
            continue
        name_problem = host_name_problem(host)
        if name_problem:
            problems.append(f"{where}: host {host!r} is malformed: {name_problem}")
            continue
        slots_match = SLOTS_PATTERN.match(rest) if rest else None
        if not rest:
            problems.append(f"{where}: slots are missing; write '{host} slots=N' (N = GPUs on that node, "
                            f"or CPU ranks with DS_ACCELERATOR=cpu)")
            continue
        if slots_match is None:
            problems.append(f"{where}: expected exactly 'slots=N' after the host; write '{host} slots=N'")
            continue
        value = slots_match.group("slots")
        if not value.isdigit() or int(value) == 0:
            problems.append(f"{where}: slots={value} is not a positive whole number; write '{host} slots=N' "
                            f"with N >= 1, or delete the line to leave the node out")
            continue
        if host in seen:
            problems.append(f"{where}: host {host!r} is already listed on line {seen[host]}; keep one line per "
                            f"node with its total slots")
            continue
        seen[host] = number
        hosts.append(Host(host, int(value), number))
    if problems:
        raise HostfileError("\n".join(problems))
    if not hosts:
        raise HostfileError(f"{source} lists no hosts; add one line per node, e.g. '{EXAMPLE_LINE}'")
    return hosts


def parse_hostfile(path: str) -> list[Host]:
    if not os.path.isfile(path):
        raise HostfileError(f"hostfile {path!r} does not exist (DeepSpeed would silently run on this machine "
                            f"alone); see hostfiles/README.md, or `python -m launcher hostfile --from-slurm`")
    with open(path) as handle:
        return parse_hostfile_text(handle.read(), source=path)


def _filter_spec(spec: str, hosts: OrderedDict, flag: str) -> dict[str, list[int]]:
    """``NAME[:SLOT,SLOT]@NAME`` -> {name: slots} (empty list: the whole host), checked against ``hosts``."""
    selected: dict[str, list[int]] = {}
    for part in spec.split("@"):
        name, _, slot_text = part.partition(":")
        if name not in hosts:
            raise HostfileError(f"{flag} {spec!r}: host {name!r} is not in the hostfile ({', '.join(hosts)})")
        slots: list[int] = []
        for item in filter(None, slot_text.split(",")):
            if not item.isdigit() or int(item) >= len(hosts[name]):
                raise HostfileError(f"{flag} {spec!r}: {name} has slots 0..{len(hosts[name]) - 1}, not {item!r}")
            slots.append(int(item))
        selected.setdefault(name, []).extend(slots)
    return selected


def active_hosts(hosts: list[Host], include: str = "", exclude: str = "") -> OrderedDict[str, list[int]]:
    """The hosts and slot ids a run uses, in rank order, with DeepSpeed's include/exclude semantics."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be combined; use one of them")
    pool = OrderedDict((host.name, list(range(host.slots))) for host in hosts)
    if include:
        chosen = _filter_spec(include, pool, "--include")
        result = OrderedDict((name, sorted(set(chosen[name])) or slots) for name, slots in pool.items()
                             if name in chosen)
    elif exclude:
        dropped = _filter_spec(exclude, pool, "--exclude")
        result = OrderedDict()
        for name, slots in pool.items():
            if name in dropped:
                slots = [slot for slot in slots if dropped[name] and slot not in dropped[name]]
            if slots:
                result[name] = slots
    else:
        result = pool
    if not result:
        raise HostfileError(f"--include {include!r} / --exclude {exclude!r} leaves no slot to run on")
    return result


# -- SLURM -------------------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {text!r}: ']' without '['")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"node list {text!r}: '[' without ']'")
    parts.append(current)
    return [part for part in parts if part]


def _expand_range_list(ranges: str, whole: str) -> list[str]:
    values = []
    for item in ranges.split(","):
        start, dash, end = item.partition("-")
        if not start.isdigit() or (dash and not end.isdigit()):
            raise ValueError(f"node list {whole!r}: {item!r} is not a number or a range like 01-04")
        if not dash:
            values.append(start)
            continue
        if int(end) < int(start):
            raise ValueError(f"node list {whole!r}: range {item!r} runs backwards")
        width = len(start) if start.startswith("0") else 0
        values.extend(str(number).zfill(width) for number in range(int(start), int(end) + 1))
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``node[01-03,07]``, ``r[1-2]-n[1-2]``, ``a,b[3-4]``), in SLURM's order."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", part)
        choices = [_expand_range_list(piece[1:-1], nodelist) if piece.startswith("[") else [piece]
                   for piece in pieces if piece]
        hosts.extend("".join(combination) for combination in itertools.product(*choices))
    if not hosts:
        raise ValueError("the SLURM node list is empty")
    return hosts


def slurm_slots(environ: dict[str, str]) -> int | None:
    """GPUs per node of the SLURM job: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE ('4', 'gpu:4', 'gpu:a100:4'),
    or the count of SLURM_JOB_GPUS ids ('0,1,2,3'). None when the job names no GPUs."""
    on_node = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit() and int(on_node) > 0:
        return int(on_node)
    per_node = environ.get("SLURM_GPUS_PER_NODE", "").strip()
    if per_node:
        count = per_node.split(",")[0].split(":")[-1].split("(")[0]
        if count.isdigit() and int(count) > 0:
            return int(count)
    job_gpus = [item for item in environ.get("SLURM_JOB_GPUS", "").split(",") if item.strip()]
    return len(job_gpus) or None


def hostfile_from_slurm(environ: dict[str, str], slots: int | None = None) -> str:
    """The hostfile text for the current SLURM job (``slots`` overrides the GPU count it finds)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise HostfileError("SLURM_JOB_NODELIST is not set: run this inside a SLURM job (salloc/sbatch)")
    try:
        hosts = expand_nodelist(nodelist)
    except ValueError as error:
        raise HostfileError(str(error)) from None
    count = slots if slots is not None else slurm_slots(environ)
    if not count:
        raise HostfileError("the SLURM job names no GPUs (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE and "
                            "SLURM_JOB_GPUS are unset); pass --slots N (N CPU ranks with DS_ACCELERATOR=cpu)")
    header = f"# SLURM job {environ.get('SLURM_JOB_ID', '?')}: {nodelist}, {count} slot(s) per node\n"
    return header + "".join(f"{host} slots={count}\n" for host in hosts)
