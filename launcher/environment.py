"""What every node's ranks get in their environment: ``.deepspeed_env``, and secrets kept off command lines.

DeepSpeed's pdsh runner starts ranks over ssh, so the launching shell's environment does not reach
them; it exports only ``PYTHON*`` (and ``NCCL*`` on CUDA) plus each ``KEY=VALUE`` line of a
``.deepspeed_env`` file, where a blank line, a comment, or a value its shell quoting cannot carry
breaks the launch. This module writes that file from an allowlist plus variables the user names::

    exports = collect_exports(os.environ, ["WANDB_API_KEY", "MY_FLAG=1"])
    write_deepspeed_env("/private/dir/.deepspeed_env", exports.sent)   # mode 0600, no blank lines
    print(held_back_note(exports))                                        # which secrets stay here

Secrets (AWS keys, tokens, passwords: see ``is_secret``) are never sent. DeepSpeed turns every
exported variable into ``export NAME=VALUE;`` on the pdsh command line (``-x NAME=VALUE`` for
mpirun, ``--export=...`` for srun), which every user of the launching machine and of each node can
read in ``ps``. So secrets stay out of ``.deepspeed_env`` and out of the environment DeepSpeed's
runner starts with (``without_secrets``: it also copies ``PYTHON*``, ``MLFLOW*``, ``NCCL*``...
variables onto that line by itself); each node holds its own credentials, and the doctor checks
them there. ``MaskingPump`` still filters the secrets set here out of what the run prints.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

# Exact names that a run on another node needs as they are here.
ALLOWED_NAMES = (
    "PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
    "CUDA_HOME", "TORCH_EXTENSIONS_DIR", "TORCH_CUDA_ARCH_LIST", "HF_HOME", "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "JAVA_HOME", "HADOOP_HOME", "HADOOP_CONF_DIR",
)
# Families: collective-library tuning (NCCL, gloo, libfabric for EFA) and S3 settings and credentials.
ALLOWED_PREFIXES = ("NCCL_", "TORCH_NCCL_", "GLOO_", "FI_", "AWS_")
SECRET_PATTERN = re.compile(r"SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|(^|_)(KEY|TOKEN)S?(_|$)", re.IGNORECASE)
# A name ending like this holds where a secret lives (AWS_SHARED_CREDENTIALS_FILE, AWS_WEB_IDENTITY_TOKEN_FILE):
# the path is what every node needs, and the file's content stays on the node.
FILE_NAME_PATTERN = re.compile(r"_(FILE|PATH|DIR)$", re.IGNORECASE)
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# DeepSpeed wraps a value in double quotes inside the remote shell command; these would be interpreted.
UNSAFE_CHARACTERS = set('"$`\\\n\r')
MASK = "****"
MINIMUM_MASKED_LENGTH = 4


class ExportError(ValueError):
    """A variable that cannot be exported to the nodes; the message names it (never its value)."""


def is_secret(name: str) -> bool:
    return bool(SECRET_PATTERN.search(name)) and not FILE_NAME_PATTERN.search(name)


def _check(name: str, value: str) -> None:
    if not NAME_PATTERN.match(name):
        raise ExportError(f"{name!r} is not a valid environment variable name")
    bad = sorted(set(value) & UNSAFE_CHARACTERS)
    if bad:
        shown = ", ".join(repr(char) for char in bad)
        raise ExportError(f"the value of {name} contains {shown}, which DeepSpeed's remote export cannot "
                                f"carry; set {name} in the nodes' shell profile instead")


@dataclass(frozen=True)
class Exports:
    """What a remote launch carries to the nodes, and the secrets each node has to provide itself."""
    sent: dict[str, str]                 # no secrets: written to .deepspeed_env, applied in the doctor's probe
    held_back: dict[str, str] = field(default_factory=dict, repr=False)  # secrets set here, never sent
    required: tuple[str, ...] = ()       # secrets named with --export: every node must hold them

    @property
    def not_sent(self) -> list[str]:
        return sorted(set(self.held_back) | set(self.required))


def collect_exports(environ: dict[str, str], named: list[str] | tuple[str, ...] = ()) -> Exports:
    """Allowlisted variables present in ``environ`` plus each ``NAME`` (value taken from ``environ``)
    or ``NAME=VALUE`` in ``named``, split into what is sent and the secrets that are not. Sorted by
    name, so the file is the same on every launch."""
    chosen = {name: value for name, value in environ.items()
              if name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)}
    required = []
    for item in named:
        name, equals, value = item.partition("=")
        if not NAME_PATTERN.match(name):
            raise ExportError(f"{name!r} is not a valid environment variable name")
        if is_secret(name):
            if equals:  # the value is already in this process's own command line; refuse to spread it further
                raise ExportError(f"--export {name}=...: a secret's value on a command line can be read by every "
                                  f"user of the machine (ps); keep {name} on each node instead (hostfiles/README.md, "
                                  f"'Credentials on the nodes') and pass --export {name} so the doctor checks it there")
            required.append(name)
            if name in environ:
                chosen[name] = environ[name]
            continue
        if not equals:
            if name not in environ:
                raise ExportError(f"--export {name}: {name} is not set here; set it, or pass {name}=VALUE")
            value = environ[name]
        chosen[name] = value
    sent = {name: value for name, value in sorted(chosen.items()) if not is_secret(name)}
    for name, value in sent.items():
        _check(name, value)
    held_back = {name: value for name, value in sorted(chosen.items()) if is_secret(name)}
    return Exports(sent, held_back, tuple(sorted(set(required))))


def without_secrets(environ: dict[str, str]) -> dict[str, str]:
    """``environ`` less every secret-looking variable: what DeepSpeed's runner (and srun) may see."""
    return {name: value for name, value in environ.items() if not is_secret(name)}


def held_back_note(exports: Exports) -> str | None:
    """One line naming the secrets a remote launch does not carry and where the nodes get them instead."""
    if not exports.not_sent:
        return None
    checked = f"; the doctor checks {', '.join(exports.required)} on every node" if exports.required else ""
    return (f"not sent to the nodes: {', '.join(exports.not_sent)} (a secret on a command line can be read by every "
            f"user of the machine); each node uses its own: AWS keys from ~/.aws/credentials (mode 0600) or an "
            f"instance role, other secrets from the environment ssh commands get there{checked} "
            f"(hostfiles/README.md, 'Credentials on the nodes')")


def deepspeed_env_text(exports: dict[str, str]) -> str:
    """``KEY=VALUE`` lines: no blank lines and no comments, which DeepSpeed's reader cannot take."""
    return "".join(f"{name}={value}\n" for name, value in exports.items())


def write_deepspeed_env(path: str, exports: dict[str, str]) -> str:
    """Write the file readable by its owner only; returns ``path``. A secret here is a bug, not a choice:
    DeepSpeed would put it on the pdsh command line."""
    for name, value in exports.items():
        if is_secret(name):
            raise ExportError(f"{name} looks like a secret and is never written to .deepspeed_env")
        _check(name, value)
    temporary = f"{path}.tmp{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(deepspeed_env_text(exports))
    os.replace(temporary, path)
    return path


def secret_values(exports: dict[str, str]) -> list[str]:
    values = {value for name, value in exports.items() if is_secret(name) and len(value) >= MINIMUM_MASKED_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: a secret inside another is masked whole


class Masker:
    """Replaces secret values in a byte stream that arrives in arbitrary chunks.

    ``feed`` returns what can be shown now; the end of a chunk that could be the start of a secret
    is held back until the next chunk (or ``flush``) decides it, so a secret split across two reads
    is still caught, and ordinary output is never delayed.
    """

    def __init__(self, secrets: list[str]):
        self.secrets = [secret.encode() for secret in secrets if secret]
        self.pending = b""

    def _mask(self, data: bytes) -> bytes:
        for secret in self.secrets:
            data = data.replace(secret, MASK.encode())
        return data

    def feed(self, chunk: bytes) -> bytes:
        data = self._mask(self.pending + chunk)
        hold = 0
        for secret in self.secrets:
            for length in range(min(len(secret) - 1, len(data)), hold, -1):
                if data.endswith(secret[:length]):
                    hold = length
                    break
        self.pending = data[len(data) - hold:] if hold else b""
        return data[:len(data) - hold] if hold else data

    def flush(self) -> bytes:
        data, self.pending = self.pending, b""
        return data


class MaskingPump(threading.Thread):
    """Copies a child's output stream to ours through a :class:`Masker` as the bytes arrive."""

    def __init__(self, source: BinaryIO, sink: BinaryIO, secrets: list[str]):
        super().__init__(daemon=True)
        self.source, self.sink, self.masker = source, sink, Masker(secrets)

    def run(self) -> None:
        descriptor = self.source.fileno()
        while chunk := os.read(descriptor, 65536):
            self._write(self.masker.feed(chunk))
        self._write(self.masker.flush())
        self.source.close()

    def _write(self, data: bytes) -> None:
        if data:
            self.sink.write(data)
            self.sink.flush()
