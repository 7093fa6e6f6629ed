"""What every node's ranks get in their environment: ``.deepspeed_env`` and secret masking.

DeepSpeed's pdsh runner starts ranks over ssh, so the launching shell's environment does not reach
them; it exports only ``PYTHON*`` (and ``NCCL*`` on CUDA) plus each ``KEY=VALUE`` line of a
``.deepspeed_env`` file, where a blank line, a comment, or a value its shell quoting cannot carry
breaks the launch. This module writes that file from an allowlist plus variables the user names::

    exports = collect_exports(os.environ, ["WANDB_API_KEY", "MY_FLAG=1"])
    write_deepspeed_env("/private/dir/.deepspeed_env", exports)   # mode 0600, no blank lines
    print(deepspeed_env_text(masked(exports)))                      # secrets shown as ****

Secrets (AWS keys, tokens, passwords: see ``is_secret``) are exported like any other variable but
never printed: ``masked`` hides them in what the launcher shows, and ``MaskingPump`` filters them out
of DeepSpeed's own output (its runner logs the whole pdsh command, exports included).
"""

from __future__ import annotations

import os
import re
import threading
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


def collect_exports(environ: dict[str, str], named: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Allowlisted variables present in ``environ`` plus each ``NAME`` (value taken from ``environ``)
    or ``NAME=VALUE`` in ``named``. Sorted by name, so the file is the same on every launch."""
    exports = {name: value for name, value in environ.items()
               if name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES)}
    for item in named:
        name, equals, value = item.partition("=")
        if not equals:
            if name not in environ:
                raise ExportError(f"--export {name}: {name} is not set here; set it, or pass {name}=VALUE")
            value = environ[name]
        exports[name] = value
    for name, value in exports.items():
        _check(name, value)
    return dict(sorted(exports.items()))


def deepspeed_env_text(exports: dict[str, str]) -> str:
    """``KEY=VALUE`` lines: no blank lines and no comments, which DeepSpeed's reader cannot take."""
    return "".join(f"{name}={value}\n" for name, value in exports.items())


def write_deepspeed_env(path: str, exports: dict[str, str]) -> str:
    """Write the file readable by its owner only (it may hold credentials); returns ``path``."""
    for name, value in exports.items():
        _check(name, value)
    temporary = f"{path}.tmp{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(deepspeed_env_text(exports))
    os.replace(temporary, path)
    return path


def masked(exports: dict[str, str]) -> dict[str, str]:
    return {name: MASK if is_secret(name) and value else value for name, value in exports.items()}


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
