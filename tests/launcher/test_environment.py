"""``.deepspeed_env``: allowlist plus named variables, a format DeepSpeed's reader takes, secrets masked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from launcher.environment import (
    ExportError,
    Masker,
    collect_exports,
    deepspeed_env_text,
    is_secret,
    masked,
    secret_values,
    write_deepspeed_env,
)

ENVIRON = {
    "PATH": "/venv/bin:/usr/bin", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "NCCL_SOCKET_IFNAME": "eth0",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t/value+x", "HOME": "/root",
    "SSH_AUTH_SOCK": "/tmp/agent", "WANDB_API_KEY": "wandb-key-123", "TERM": "xterm", "MY_FLAG": "on",
}


def read_like_deepspeed(text: str) -> dict[str, str]:
    """DeepSpeed's runner: every line split at the first '='; a line without one raises."""
    exports = {}
    for line in text.splitlines(keepends=True):
        key, value = line.split("=", maxsplit=1)
        exports[key.strip()] = value.strip()
    return exports


def test_allowlist_and_named_variables_only():
    exports = collect_exports(ENVIRON, ["WANDB_API_KEY", "EXTRA=1"])
    assert exports == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t/value+x",
                       "DS_ACCELERATOR": "cpu", "EXTRA": "1", "NCCL_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
                       "PATH": "/venv/bin:/usr/bin", "WANDB_API_KEY": "wandb-key-123"}
    assert list(exports) == sorted(exports)  # the same file on every launch


def test_the_file_has_no_blank_lines_reads_back_and_is_private(tmp_path):
    exports = collect_exports(ENVIRON, ["MY_FLAG", "EMPTY="])
    path = write_deepspeed_env(str(tmp_path / ".deepspeed_env"), exports)
    text = Path(path).read_text()
    assert text.endswith("\n") and "\n\n" not in text and not text.startswith("\n")
    assert "#" not in text
    assert read_like_deepspeed(text) == exports
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == [".deepspeed_env"]  # no temporary left behind


def test_a_named_variable_that_is_not_set_is_an_error():
    with pytest.raises(ExportError, match="--export WANDB_PROJECT: WANDB_PROJECT is not set here"):
        collect_exports(ENVIRON, ["WANDB_PROJECT"])


@pytest.mark.parametrize("value", ['a"b', "a$b", "a`b`", "a\\b", "line\nbreak"])
def test_values_the_remote_shell_would_mangle_are_refused_without_showing_them(value):
    with pytest.raises(ExportError) as caught:
        collect_exports({"API_TOKEN": value}, ["API_TOKEN"])
    assert "API_TOKEN" in str(caught.value) and value not in str(caught.value)
    assert "shell profile" in str(caught.value)


def test_a_bad_variable_name_is_refused():
    with pytest.raises(ExportError, match="'1BAD' is not a valid environment variable name"):
        collect_exports({}, ["1BAD=x"])


@pytest.mark.parametrize("name, secret", [
    ("AWS_SECRET_ACCESS_KEY", True), ("AWS_ACCESS_KEY_ID", True), ("AWS_SESSION_TOKEN", True),
    ("HF_TOKEN", True), ("WANDB_API_KEY", True), ("DB_PASSWORD", True), ("KEY", True),
    ("AWS_ENDPOINT_URL", False), ("PATH", False), ("KEYBOARD", False), ("MONKEY_LEVEL", False),
    ("GITHUB_TOKEN", True), ("PGPASSWORD", True), ("AWS_CONTAINER_AUTHORIZATION_TOKEN", True),
    # Settings that only look like secrets: the nodes need their values.
    ("TOKENIZERS_PARALLELISM", False), ("AWS_SHARED_CREDENTIALS_FILE", False), ("AWS_WEB_IDENTITY_TOKEN_FILE", False),
    ("SSH_KEY_PATH", False),
])
def test_which_names_are_secrets(name, secret):
    assert is_secret(name) == secret


def test_masked_view_hides_only_secret_values():
    exports = collect_exports(ENVIRON, ["WANDB_API_KEY"])
    shown = deepspeed_env_text(masked(exports))
    assert "AWS_SECRET_ACCESS_KEY=****\n" in shown and "WANDB_API_KEY=****\n" in shown
    assert "s3cr3t" not in shown and "wandb-key-123" not in shown
    assert "AWS_ENDPOINT_URL=http://127.0.0.1:9000\n" in shown


def test_masker_catches_a_secret_split_across_reads_and_delays_nothing_else():
    masker = Masker(secret_values({"AWS_SECRET_ACCESS_KEY": "abcdef123", "PATH": "/bin"}))
    pieces = [b"export AWS_SECRET_ACCESS_KEY=ab", b"cdef", b"123; cd /w\n", b"step 1 loss=3.0\r", b"ab"]
    shown = [masker.feed(piece) for piece in pieces]
    assert shown[0] == b"export AWS_SECRET_ACCESS_KEY="   # "ab" could begin the secret: held back
    assert shown[1] == b""
    assert shown[2] == b"****; cd /w\n"
    assert shown[3] == b"step 1 loss=3.0\r"                  # ordinary output passes at once
    assert shown[4] == b"" and masker.flush() == b"ab"      # a prefix that never completes is released
