"""Bad input and faults on the pretraining side: each case pins its exact outcome.

Configs and overrides are refused when first read, before any process group or model exists; checkpoint
folders are opened with the restricted unpickler, and a file that needs more is refused by name; a
``--resume`` target that is no complete checkpoint is named with the tags that exist; an unwritable output
folder is named; a rank whose data fails stops every rank with its message; a SIGKILL while saving leaves
``latest`` on the last complete checkpoint; a resumed run logs every step once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.export import export
from pretrain.lockstep import DataFailure, lockstep_batches
from pretrain.methods import resolve_objectives
from pretrain.metrics_log import MetricsLog
from pretrain.safe_loading import UnsafeCheckpointError, load_file
from pretrain.schema import PretrainConfig
from pretrain.train import main as pretrain_main
from tests.pretrain.conftest import REPO, run_pretrain, write_ds_config, write_experiment
from tests.pretrain.objectives.test_distributed import spawn_gloo


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _poison(path: Path, marker: Path) -> None:
    """Rewrite a checkpoint file so that opening it with the full unpickler runs code."""
    state = torch.load(path, map_location="cpu", weights_only=False) if path.exists() else {}
    state = state if isinstance(state, dict) else {"value": state}
    state["payload"] = _RunsCode(marker)
    torch.save(state, path)


# -- configuration: refused when first read --------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["run.log_every=0"], "run.log_every: must be at least 1, got 0"),
    (["data.mode=exactt"], "data.mode: must be one of exact, resampled, got 'exactt'"),
    (["data.decoder=nvjpeg"], "data.decoder: must be one of pil, dali, auto, got 'nvjpeg'"),
    (["optim.lr=[1, 2"], "override 'optim.lr=[1, 2': the value '[1, 2' is not valid YAML"),
    (["optim.shedule=cosine"], "unknown key optim.'shedule' in OptimConfig"),
    (["run.seed=forty-two"], "run.seed: expected int, got 'forty-two'"),
    (["objectives.mlm.probability=1.5"], "objectives.mlm.probability: must lie in [0, 1], got 1.5"),
])
def test_config_values_are_refused_when_read(overrides, message):
    with pytest.raises(ConfigError) as error:
        resolve_objectives(load_config(PretrainConfig, str(REPO / "pretrain/configs/demo.yaml"), overrides))
    assert message in str(error.value)


def test_a_bad_override_stops_before_any_process_group(tmp_path, capsys):
    """The entry point refuses it with exit status 2 and the override named; no rank or model is started."""
    experiment = write_experiment(tmp_path, {"train": "unused-{0..1}.tar"})
    code = pretrain_main(["--config", str(experiment), "--deepspeed_config", str(REPO / "ds_configs/zero0_fp32.json"),
                          "--set", "run.log_every=0"])
    assert code == 2
    assert "config error: run.log_every: must be at least 1, got 0" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# -- output folder -------------------------------------------------------------------------------------------
@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into: mode 0555, or (as root, who ignores modes) a read-only tmpfs."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only folder here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder_is_named_without_a_resume_hint(tmp_path, read_only_dir, capsys):
    experiment = write_experiment(tmp_path, {"train": "unused-{0..1}.tar"})
    code = pretrain_main(["--config", str(experiment), "--deepspeed_config", str(REPO / "ds_configs/zero0_fp32.json"),
                          "--output-dir", str(read_only_dir / "run")])
    error = capsys.readouterr().err
    assert code == 2
    assert f"error: cannot write to {read_only_dir / 'run'}" in error
    assert "choose a writable folder with --output-dir" in error and "re-run" not in error


# -- --resume targets ----------------------------------------------------------------------------------------
def test_resume_targets_that_are_no_checkpoint_are_named(tmp_path):
    directory = tmp_path / "checkpoints"
    (directory / "global_step5").mkdir(parents=True)
    (directory / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.ResumeError,
                       match=r"global_step7 does not exist \(checkpoints there: global_step5\)"):
        checkpoint.resolve_resume(str(directory / "global_step7"), str(tmp_path / "own"))
    with pytest.raises(checkpoint.ResumeError, match=r"not a complete checkpoint of this project \(missing "
                                                     r"task_state.pt, client_rank000.pt\)"):
        checkpoint.resolve_resume(str(directory / "global_step5"), str(tmp_path / "own"))
    with pytest.raises(checkpoint.ResumeError, match=r"no 'latest' file there.*\(checkpoints there: global_step5\)"):
        checkpoint.resolve_resume(str(directory), str(tmp_path / "own"))
    assert checkpoint.resolve_resume("auto", str(tmp_path / "own")) is None  # a fresh run


# -- checkpoint files that would run code -------------------------------------------------------------------
def test_a_file_that_is_no_torch_file_is_named(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"GIF89a, not a checkpoint")
    with pytest.raises(UnsafeCheckpointError, match=r"weights.pth is not a PyTorch checkpoint file"):
        load_file(str(path))


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "task_state.pt"
    _poison(path, marker)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_file(str(path))
    assert f"refusing to open {path}: it holds the Python object posix.system" in str(error.value)
    assert "--trust-checkpoint" in str(error.value)
    assert not marker.exists()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_shards) -> Path:
    """One optimizer step of the tiny model on 1 CPU rank (ZeRO-0), saved as global_step1."""
    directory = tmp_path_factory.mktemp("saved_run")
    experiment = write_experiment(directory, tiny_shards)
    run_pretrain(experiment, write_ds_config(directory, "zero0_fp32.json"), ranks=1, extra=["--max-steps", "1"])
    return directory


def _copy_run(source: Path, target: Path) -> Path:
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    experiment = target / "experiment.yaml"
    experiment.write_text(experiment.read_text().replace(str(source), str(target)))
    return target


@pytest.mark.slow
def test_resume_refuses_a_deepspeed_file_that_runs_code(tmp_path, saved_run):
    """DeepSpeed opens its own files with the full unpickler; under our loop it gets the restricted one."""
    run = _copy_run(saved_run, tmp_path / "run_copy")
    marker = tmp_path / "ran"
    model_states = run / "run" / "checkpoints" / "global_step1" / "mp_rank_00_model_states.pt"
    _poison(model_states, marker)
    result = run_pretrain(run / "experiment.yaml", run / "ds_zero0_fp32.json", ranks=1, extra=["--max-steps", "2"],
                          check=False)
    assert result.returncode != 0
    assert f"refusing to open {model_states}: it holds the Python object posix.system" in result.stderr
    assert not marker.exists()


def test_export_refuses_our_own_files_that_run_code(tmp_path, saved_run):
    run = _copy_run(saved_run, tmp_path / "run_copy")
    marker = tmp_path / "ran"
    task_state = run / "run" / "checkpoints" / "global_step1" / "task_state.pt"
    _poison(task_state, marker)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to open {task_state}"):
        export(str(run / "run" / "checkpoints"), str(tmp_path / "out.safetensors"))
    assert not marker.exists()
    export(str(run / "run" / "checkpoints"), str(tmp_path / "out.safetensors"), trusted=True)  # the user vouches
    assert marker.exists()


# -- a rank whose data fails stops every rank with its message -------------------------------------------------
class _Loader:
    """Two batches, then (on rank 1 only) the error a vanished data source gives."""

    def __init__(self, rank: int):
        self.rank, self.epoch = rank, 0

    def __iter__(self):
        yield {"rank": self.rank}
        yield {"rank": self.rank}
        if self.rank == 1:
            raise OSError("no readable shard left in /data/train-{000000..000007}.tar")
        yield {"rank": self.rank}

    def end_epoch(self):
        self.epoch += 1


def _two_ranks_take_batches(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    taken, message = 0, None
    try:
        for _ in lockstep_batches(_Loader(rank), dist.group.WORLD):
            taken += 1
    except DataFailure as error:
        message = str(error)
    dist.barrier()  # both ranks are done with the group before either tears it down
    return {"taken": taken, "error": message}


def test_a_data_failure_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    results = spawn_gloo(_two_ranks_take_batches, tmp_path)
    for result in results:
        assert result["taken"] == 2
        assert result["error"] == ("reading training data failed: rank 1: OSError: no readable shard left in "
                                   "/data/train-{000000..000007}.tar")


# -- SIGKILL while a checkpoint is written -------------------------------------------------------------------
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import deepspeed, torch
    from pretrain import checkpoint
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    model = torch.nn.Linear(4, 4)
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    save = dict(client_state={"step": 0}, task_state={"step": 0}, config_yaml="method: albef\\n")
    checkpoint.save_checkpoint(engine, sys.argv[1], 1, **save)
    real_save = torch.save
    def dies_half_way(obj, path, *args, **kwargs):
        if "global_step2" in str(path):  # half of DeepSpeed's model file, then the machine goes away
            with open(path, "wb") as handle:
                handle.write(b"PK\\x03\\x04 partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *args, **kwargs)
    torch.save = dies_half_way
    checkpoint.save_checkpoint(engine, sys.argv[1], 2, **save)
""")


def test_sigkill_while_saving_leaves_latest_on_the_last_complete_checkpoint(tmp_path):
    from tests.pretrain.conftest import free_port

    directory = tmp_path / "checkpoints"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(directory), str(free_port())], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (directory / "global_step2").is_dir()  # the interrupted save left its partial files
    assert (directory / "latest").read_text() == "global_step1"
    assert checkpoint.resolve_resume("auto", str(directory)) == (str(directory), "global_step1")
    with pytest.raises(checkpoint.ResumeError, match="global_step2 is not a complete checkpoint"):
        checkpoint.resolve_resume(str(directory / "global_step2"), str(directory))


# -- a resumed run logs every step once ------------------------------------------------------------------------
def test_a_resumed_log_keeps_one_record_per_step(tmp_path):
    first = MetricsLog(str(tmp_path), enabled=True)
    for step in range(1, 9):  # killed after logging step 8; the last checkpoint is step 5
        first.write(step, {"loss": float(step)}, keys=[f"a{step}"])
    first.close()
    resumed = MetricsLog(str(tmp_path), enabled=True, resumed_at=5)
    for step in range(6, 11):
        resumed.write(step, {"loss": 100.0 + step}, keys=[f"b{step}"])
    resumed.close()
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [record["step"] for record in records if "step" in record]
    assert steps == list(range(1, 11))
    assert [record["loss"] for record in records if "step" in record][4:6] == [5.0, 106.0]
    assert any("dropped 3 logged step(s) after step 5" in record.get("note", "") for record in records)
    keys = [json.loads(line)["keys"] for line in (tmp_path / "logs" / "keys_rank000.jsonl").read_text().splitlines()]
    assert keys == [[f"a{step}"] for step in range(1, 6)] + [[f"b{step}"] for step in range(6, 11)]
