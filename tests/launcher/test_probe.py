"""The per-node probe: its answer to a JSON request on stdin, as the doctor receives it over ssh."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import pytest

from launcher import probe
from tests.pretrain.conftest import REPO


def write_tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_first_shard_opens_as_a_tar_or_says_why_not(tmp_path):
    write_tar(tmp_path / "good-000000.tar", {"k0.jpg": b"jpeg", "k0.txt": b"a caption"})
    write_tar(tmp_path / "empty-000000.tar", {})
    (tmp_path / "junk-000000.tar").write_bytes(b"this is not a tar archive" * 40)
    good = probe.first_shard(str(tmp_path / "good-{000000..000009}.tar"), "hdfs dfs -cat", 5)
    assert good == {"url": str(tmp_path / "good-000000.tar"), "ok": True, "detail": "k0.jpg"}
    assert probe.first_shard(str(tmp_path / "empty-000000.tar"), "hdfs dfs -cat", 5)["detail"] == "an empty tar"
    junk = probe.first_shard(str(tmp_path / "junk-000000.tar"), "hdfs dfs -cat", 5)
    assert not junk["ok"] and junk["detail"].startswith("ReadError")
    missing = probe.first_shard(str(tmp_path / "gone-{000000..000003}.tar"), "hdfs dfs -cat", 5)
    assert missing["url"] == str(tmp_path / "gone-000000.tar") and missing["detail"].startswith("SourceNotFound")


def test_a_source_that_hangs_is_cut_off_at_the_timeout():
    assert probe.first_shard("pipe:sleep 3", "hdfs dfs -cat", 0.5) == {
        "url": "pipe:sleep 3", "ok": False, "detail": "no answer within 0.5s"}


def test_port_checks():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert not probe.port_is_free(taken)
    assert probe.port_is_free(probe.free_port())


def test_the_probe_answers_on_stdout_with_the_exported_environment_applied(tmp_path, tiny_shards):
    request = {"env": {"DS_ACCELERATOR": "cpu"}, "output_dir": str(tmp_path / "not" / "yet" / "made"),
               "sources": [tiny_shards["train"]], "find_port": True}
    result = subprocess.run([sys.executable, "-m", "launcher.probe"], input=json.dumps(request), cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)
    answer = json.loads(result.stdout)
    assert answer["accelerators"] == {"mode": "cpu", "count": 0}
    assert answer["disk"]["path"] == str(tmp_path / "not" / "yet" / "made")
    assert answer["disk"]["checked"] == str(tmp_path) and answer["disk"]["writable"]
    assert [source["ok"] for source in answer["sources"]] == [True]
    assert answer["port"]["free"] and answer["port"]["port"] > 0
    assert answer["packages"] == probe.package_versions() and answer["python"] == probe.local_facts()["python"]
    assert answer["revision"] == probe.code_revision(str(REPO))


@pytest.fixture
def aws_home(tmp_path, monkeypatch):
    """No AWS settings but two files under tmp_path, so boto3 finds only what a test writes there."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # a test machine has no instance role to ask
    return tmp_path


def test_aws_credentials_say_where_they_come_from_never_what(aws_home, monkeypatch):
    assert probe.aws_credentials() == {"found": False,
                                       "detail": "none in the environment, ~/.aws or an instance role"}
    path = aws_home / "credentials"
    path.write_text("[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = s3cr3t-value-xyz\n")
    path.chmod(0o600)
    found = probe.aws_credentials()
    assert found == {"found": True, "method": "shared-credentials-file", "file": str(path), "mode": "0600",
                     "private": True}
    assert "s3cr3t" not in json.dumps(found) and "AKIDEXAMPLE" not in json.dumps(found)
    path.chmod(0o644)
    assert probe.aws_credentials()["private"] is False
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    missing = probe.aws_credentials()
    assert not missing["found"] and missing["detail"].startswith("ProfileNotFound: ")


def test_without_aws_credentials_s3_sources_are_not_read_and_secrets_are_only_named(aws_home):
    request = {"env": {"DS_ACCELERATOR": "cpu"}, "sources": ["s3://bucket/a-{000000..000003}.tar"],
               "required_secrets": ["NODE_API_TOKEN", "PRESENT_TOKEN"]}
    result = subprocess.run([sys.executable, "-m", "launcher.probe"], input=json.dumps(request), cwd=REPO,
                            env={**os.environ, "PRESENT_TOKEN": "s3cr3t-value-xyz"}, capture_output=True, text=True,
                            timeout=60, check=True)
    answer = json.loads(result.stdout)
    assert not answer["aws_credentials"]["found"]
    assert answer["sources"] == [{"url": "s3://bucket/a-{000000..000003}.tar", "ok": None,
                                  "detail": "not read: no AWS credentials"}]
    assert answer["secrets"] == {"NODE_API_TOKEN": False, "PRESENT_TOKEN": True}
    assert "s3cr3t" not in result.stdout
