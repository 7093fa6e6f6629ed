"""``.deepspeed_env``: allowlist plus named variables, a format DeepSpeed's reader takes, and never a secret."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from launcher.environment import (
    ExportError,
    Masker,
    collect_exports,
    held_back_note,
    is_secret,
    secret_values,
    without_secrets,
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


def test_allowlist_and_named_variables_are_sent_secrets_are_not():
    exports = collect_exports(ENVIRON, ["WANDB_API_KEY", "EXTRA=1"])
    assert exports.sent == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "DS_ACCELERATOR": "cpu", "EXTRA": "1",
                            "NCCL_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1", "PATH": "/venv/bin:/usr/bin"}
    assert list(exports.sent) == sorted(exports.sent)  # the same file on every launch
    assert exports.held_back == {"AWS_SECRET_ACCESS_KEY": "s3cr3t/value+x", "WANDB_API_KEY": "wandb-key-123"}
    assert exports.required == ("WANDB_API_KEY",)  # named: each node must hold it; the doctor checks
    assert "s3cr3t" not in repr(exports) and "wandb-key-123" not in repr(exports)


def test_a_secret_named_but_not_set_here_is_required_on_the_nodes_not_an_error():
    exports = collect_exports({"PATH": "/bin"}, ["HF_TOKEN"])
    assert exports.sent == {"PATH": "/bin"} and exports.held_back == {} and exports.required == ("HF_TOKEN",)


def test_a_secret_value_on_the_command_line_is_refused_without_repeating_it():
    with pytest.raises(ExportError) as caught:
        collect_exports(ENVIRON, ["WANDB_API_KEY=typed-in-clear-42"])
    message = str(caught.value)
    assert "typed-in-clear-42" not in message
    assert message.startswith("--export WANDB_API_KEY=...: a secret's value on a command line can be read by every "
                              "user of the machine (ps); keep WANDB_API_KEY on each node instead")


def test_the_held_back_note_names_the_secrets_and_where_nodes_get_them():
    note = held_back_note(collect_exports(ENVIRON, ["HF_TOKEN"]))
    assert note.startswith("not sent to the nodes: AWS_SECRET_ACCESS_KEY, HF_TOKEN (")
    assert "~/.aws/credentials (mode 0600) or an instance role" in note
    assert "the doctor checks HF_TOKEN on every node" in note
    assert "s3cr3t" not in note
    assert held_back_note(collect_exports({"PATH": "/bin", "AWS_DEFAULT_REGION": "eu-west-1"})) is None


def test_the_runner_environment_keeps_everything_but_secrets():
    kept = without_secrets(ENVIRON)
    assert set(ENVIRON) - set(kept) == {"AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"}


def test_the_file_has_no_blank_lines_reads_back_and_is_private(tmp_path):
    exports = collect_exports(ENVIRON, ["MY_FLAG", "EMPTY="]).sent
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


def test_a_secret_never_reaches_the_file(tmp_path):
    with pytest.raises(ExportError, match="AWS_SESSION_TOKEN looks like a secret and is never written"):
        write_deepspeed_env(str(tmp_path / ".deepspeed_env"), {"PATH": "/bin", "AWS_SESSION_TOKEN": "abcd"})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value", ['a"b', "a$b", "a`b`", "a\\b", "line\nbreak"])
def test_values_the_remote_shell_would_mangle_are_refused_without_showing_them(value):
    with pytest.raises(ExportError) as caught:
        collect_exports({"MY_SETTING": value}, ["MY_SETTING"])
    assert "MY_SETTING" in str(caught.value) and value not in str(caught.value)
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


def test_masker_catches_a_secret_split_across_reads_and_delays_nothing_else():
    masker = Masker(secret_values({"AWS_SECRET_ACCESS_KEY": "abcdef123", "PATH": "/bin"}))
    pieces = [b"export AWS_SECRET_ACCESS_KEY=ab", b"cdef", b"123; cd /w\n", b"step 1 loss=3.0\r", b"ab"]
    shown = [masker.feed(piece) for piece in pieces]
    assert shown[0] == b"export AWS_SECRET_ACCESS_KEY="   # "ab" could begin the secret: held back
    assert shown[1] == b""
    assert shown[2] == b"****; cd /w\n"
    assert shown[3] == b"step 1 loss=3.0\r"                  # ordinary output passes at once
    assert shown[4] == b"" and masker.flush() == b"ab"      # a prefix that never completes is released
