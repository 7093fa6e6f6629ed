"""The per-node probe: its answer to a JSON request on stdin, as the doctor receives it over ssh."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import tarfile

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
    assert missing["url"] == str(tmp_path / "gone-000000.tar") and missing["detail"].startswith("SourceUnreachable")


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
