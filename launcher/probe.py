"""What the doctor asks every node: ``python -m launcher.probe`` reads a JSON request on stdin, answers on stdout.

The doctor runs it on each host over ssh (or srun, or locally for ``no_ssh``) from the same checkout
and interpreter path that ``deepspeed`` will use there, so it sees the environment the ranks will
see: the node's own plus the exported variables, which travel on stdin and never hold a secret::

    echo '{"env": {"DS_ACCELERATOR": "cpu"}, "output_dir": "/runs/x", "sources": ["/data/a-{0..9}.tar"],
           "port": 29500, "required_secrets": ["WANDB_API_KEY"]}' | python -m launcher.probe

The answer is one JSON object: hostname, Python and package versions, code revision, accelerators,
free disk under the output directory, whether the first shard of each source opens as a tar, and
whether the master port is free (or a free one when ``find_port`` is set). With an ``s3://`` source
it says whether boto3 finds AWS credentials on the node, from where, and whether a credentials file
is private; for each required secret, whether it is set. Never a secret's value. Nothing here imports
torch unless the accelerator count is needed (DS_ACCELERATOR is not ``cpu``).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading

PACKAGES = ("torch", "torchvision", "deepspeed", "transformers", "timm")
GIT_TIMEOUT_S = 10


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_revision(directory: str) -> dict:
    """HEAD of the checkout and a digest of its uncommitted changes to tracked files (None if clean)."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", directory, *args], capture_output=True, timeout=GIT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.decode(errors="replace") if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "changes": None}
    diff = git("diff", "HEAD") or ""
    return {"commit": commit.strip(), "changes": hashlib.sha1(diff.encode()).hexdigest()[:10] if diff else None}


def local_facts() -> dict:
    """The facts every node must share with the launching host."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {"hostname": socket.gethostname(), "python": platform.python_version(), "executable": sys.executable,
            "packages": package_versions(), "revision": code_revision(repository)}


def accelerators() -> dict:
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return {"mode": "cpu", "count": 0}
    if not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/kfd"):
        return {"mode": "cuda", "count": 0}  # no GPU device node: no need to import torch to know
    try:
        import torch

        return {"mode": "cuda", "count": torch.cuda.device_count()}
    except Exception as error:  # a broken torch install is a finding, not a crash
        return {"mode": "error", "count": 0, "error": f"{type(error).__name__}: {error}"}


def disk(output_dir: str | None) -> dict:
    path = os.path.abspath(output_dir or ".")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    usage = shutil.disk_usage(existing)
    return {"path": path, "checked": existing, "free_bytes": usage.free, "writable": os.access(existing, os.W_OK)}


def first_shard(spec: str, hdfs_command: str, timeout_s: float) -> dict:
    """Open the first URL of a source and read its first tar member header, within ``timeout_s``."""
    from data_shards import storage

    try:
        url = storage.expand_urls(spec)[0]
    except (IndexError, ValueError) as error:
        return {"url": spec, "ok": False, "detail": f"no shard URL in {spec!r}: {error}"}
    answer: dict = {"url": url, "ok": False, "detail": f"no answer within {timeout_s:g}s"}

    def read() -> None:
        try:
            with storage.open_read(url, retries=1, hdfs_command=hdfs_command) as stream, \
                    tarfile.open(fileobj=stream, mode="r|") as tar:
                member = tar.next()
            answer.update(ok=member is not None, detail=member.name if member else "an empty tar")
        except Exception as error:
            answer.update(detail=f"{type(error).__name__}: {error}")

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(timeout_s)
    return dict(answer)


def aws_credentials() -> dict:
    """Whether boto3 finds credentials here and where they come from (``method``); never their values.

    botocore walks the same chain the ranks' S3 reads will: environment, ``~/.aws/credentials`` (or
    ``AWS_SHARED_CREDENTIALS_FILE``, with ``AWS_PROFILE``), ``~/.aws/config``, SSO, container and
    instance roles. A credentials file that other users can read is reported as not ``private``.
    """
    try:
        import botocore.session
    except ImportError as error:
        return {"found": False, "detail": f"botocore is not installed ({error})"}
    session = botocore.session.get_session()
    try:
        credentials = session.get_credentials()
    except Exception as error:  # a profile that does not exist, a config file that does not parse
        return {"found": False, "detail": f"{type(error).__name__}: {error}"}
    if credentials is None:
        return {"found": False, "detail": "none in the environment, ~/.aws or an instance role"}
    answer = {"found": True, "method": credentials.method}
    variable = {"shared-credentials-file": "credentials_file", "config-file": "config_file"}.get(credentials.method)
    if variable:
        path = os.path.expanduser(session.get_config_variable(variable))
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            return answer
        answer.update(file=path, mode=f"{mode:04o}", private=not mode & 0o077)
    return answer


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore binds it
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def answer(request: dict) -> dict:
    os.environ.update(request.get("env", {}))
    facts = local_facts()
    facts["accelerators"] = accelerators()
    facts["disk"] = disk(request.get("output_dir"))
    timeout_s = float(request.get("source_timeout_s", 20))
    hdfs_command = request.get("hdfs_command", "hdfs dfs -cat")
    sources = request.get("sources", [])
    if any("s3://" in spec for spec in sources):  # also `pipe:aws s3 cp s3://...`: the same credentials
        facts["aws_credentials"] = aws_credentials()
    facts["sources"] = []
    for spec in sources:
        if "s3://" in spec and not facts["aws_credentials"]["found"]:  # reading would only repeat that
            facts["sources"].append({"url": spec, "ok": None, "detail": "not read: no AWS credentials"})
        else:
            facts["sources"].append(first_shard(spec, hdfs_command, timeout_s))
    facts["secrets"] = {name: bool(os.environ.get(name)) for name in request.get("required_secrets", [])}
    if request.get("port"):
        facts["port"] = {"port": request["port"], "free": port_is_free(request["port"])}
    elif request.get("find_port"):
        facts["port"] = {"port": free_port(), "free": True}
    return facts


def main() -> int:
    request = json.loads(sys.stdin.read() or "{}")
    print(json.dumps(answer(request)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
