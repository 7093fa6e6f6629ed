"""Resuming a pretraining run on a different number of ranks (2 ranks -> 1 rank, same global batch).

Pins: a ZeRO-1 checkpoint written by 2 ranks continues on 1 rank through DeepSpeed's universal
checkpoint with exactly the losses of the same continuation from a ZeRO-0 checkpoint (whose optimizer
state is stored whole and needs no conversion), the Adam state counts every step of both runs, and the
data streams restart as documented (fresh seed = run seed + step, in the saved epoch).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.pretrain.conftest import logged_steps, run_pretrain, write_ds_config, write_experiment

pytestmark = pytest.mark.slow

SAVED_AT, RESUMED_TO = 3, 6
STAGE_TOLERANCE = 2e-4  # ZeRO stages reduce in different orders: equal to rounding only


def adam_steps(checkpoint_dir, stage: int) -> set[float]:
    if stage == 0:
        state = torch.load(checkpoint_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                           weights_only=False)["optimizer"]["state"]
    else:
        optimizer = torch.load(checkpoint_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                               weights_only=False)["optimizer_state_dict"]
        state = optimizer["base_optimizer_state"]["state"]
    return {float(parameter_state["step"]) for parameter_state in state.values()}


def notes(run_dir) -> list[str]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [record["note"] for record in map(json.loads, lines) if "note" in record]


def test_two_rank_checkpoint_continues_on_one_rank_with_its_optimizer_state(tmp_path, tiny_shards):
    runs = {}
    for stage in (0, 1):
        directory = tmp_path / f"zero{stage}"
        (directory / "one_rank").mkdir(parents=True)
        experiment = write_experiment(directory, tiny_shards, run={"save_every": SAVED_AT})
        two_ranks = write_ds_config(directory, f"zero{stage}_fp32.json")
        run_pretrain(experiment, two_ranks, ranks=2, extra=["--max-steps", str(SAVED_AT)])
        # One rank with twice the accumulation: the global batch, hence the schedule, stays the same.
        one_rank = write_ds_config(directory / "one_rank", f"zero{stage}_fp32.json", gradient_accumulation_steps=2)
        run_pretrain(experiment, one_rank, ranks=1, extra=["--max-steps", str(RESUMED_TO)])
        runs[stage] = directory / "run"

    checkpoints = runs[1] / "checkpoints"
    assert (checkpoints / f"global_step{SAVED_AT}" / "universal" / "zero").is_dir()
    assert f"world size 2 -> 1: optimizer state from global_step{SAVED_AT}/universal; data streams restart in " \
           f"epoch 0 with seed {3 + SAVED_AT}" in notes(runs[1])
    assert f"world size 2 -> 1: optimizer state from global_step{SAVED_AT}; data streams restart in epoch 0 " \
           f"with seed {3 + SAVED_AT}" in notes(runs[0])

    losses = {stage: logged_steps(run) for stage, run in runs.items()}
    assert sorted(losses[1]) == list(range(1, RESUMED_TO + 1))
    for step in range(1, RESUMED_TO + 1):
        assert losses[1][step]["loss"] == pytest.approx(losses[0][step]["loss"], abs=STAGE_TOLERANCE), step
        assert losses[1][step]["lr"] == pytest.approx(losses[0][step]["lr"], rel=1e-9), step
    # Adam's step count carried over: a fresh optimizer state would count only the resumed steps.
    for stage, run in runs.items():
        assert adam_steps(run / "checkpoints" / f"global_step{RESUMED_TO}", stage) == {float(RESUMED_TO)}, stage
    assert len(list((checkpoints / f"global_step{RESUMED_TO}").glob("client_rank*.pt"))) == 1
