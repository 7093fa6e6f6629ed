"""The pretraining entry point under the real ``deepspeed`` launcher on CPU ranks.

Pins: every ds_config runs (ZeRO-0 and ZeRO-3, with export, in test_adding_an_objective.py); ZeRO 0, 2 and 3
give the same fp32 losses; a killed and resumed run continues with the same losses and samples as an
uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.pretrain.conftest import (
    REPO,
    free_port,
    logged_keys,
    logged_steps,
    run_pretrain,
    write_ds_config,
    write_experiment,
)

pytestmark = pytest.mark.slow

# fp32 on CPU: different ZeRO stages reduce in different orders, so equality is to rounding only.
STAGE_TOLERANCE = 2e-4


# zero0_fp32.json and zero3_bf16.json run in tests/pretrain/test_adding_an_objective.py (2 ranks, then export).
@pytest.mark.parametrize("name", ["zero1_fp32.json", "zero2_bf16.json", "zero3_offload_bf16.json", "zero2_fp16.json"])
def test_each_ds_config_runs_three_steps(tmp_path, tiny_shards, name):
    experiment = write_experiment(tmp_path, tiny_shards)
    result = run_pretrain(experiment, write_ds_config(tmp_path, name), ranks=1, extra=["--max-steps", "3"])
    steps = logged_steps(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in steps.values())
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "global_step3"
    if name == "zero2_fp16.json":
        from deepspeed.accelerator import get_accelerator

        downgraded = "CPU run: this CPU lacks fp16 support in DeepSpeed; fp16 downgraded to bf16" in result.stdout
        assert downgraded == (not get_accelerator().is_fp16_supported())  # said in the log, never silent


def test_zero_stages_give_the_same_losses(tmp_path, tiny_shards):
    losses = {}
    for stage, name in ((0, "zero0_fp32.json"), (2, "zero2_bf16.json"), (3, "zero3_bf16.json")):
        directory = tmp_path / f"stage{stage}"
        directory.mkdir()
        experiment = write_experiment(directory, tiny_shards)
        ds_config = write_ds_config(directory, name, bf16={"enabled": False})
        run_pretrain(experiment, ds_config, ranks=2, extra=["--max-steps", "5"])
        losses[stage] = [logged_steps(directory / "run")[step]["loss"] for step in range(1, 6)]
    for stage in (2, 3):
        assert losses[stage] == pytest.approx(losses[0], abs=STAGE_TOLERANCE, rel=STAGE_TOLERANCE), stage


def test_killed_run_resumes_with_the_same_losses_and_samples(tmp_path, tiny_shards):
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_dir.mkdir()
    killed_dir.mkdir()
    ds_config = write_ds_config(tmp_path, "zero2_bf16.json", bf16={"enabled": False})
    run_pretrain(write_experiment(straight_dir, tiny_shards), ds_config, extra=["--max-steps", "10"])

    experiment = write_experiment(killed_dir, tiny_shards, run={"save_every": 5})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [str(Path(os.sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
               str(free_port()), "--module", "pretrain", "--config", str(experiment), "--deepspeed_config",
               str(ds_config), "--max-steps", "10"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    latest = killed_dir / "run" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, wherever they are
    process.wait()
    assert latest.read_text() == "global_step5"
    run_pretrain(experiment, ds_config, extra=["--max-steps", "10"])  # --resume auto

    straight, resumed = logged_steps(straight_dir / "run"), logged_steps(killed_dir / "run")
    for step in range(1, 11):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], abs=1e-5), step
    for rank in range(2):
        assert logged_keys(killed_dir / "run", rank) == logged_keys(straight_dir / "run", rank)
