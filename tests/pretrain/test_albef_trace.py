"""ALBEF's pinned loss trace: the demo model's first 20 steps on 2 CPU ranks give the recorded losses.

The values below were recorded with the ALBEF-only task module that preceded the composable objectives
(one class with ITC, ITM and MLM written inline), on the same data, config and seeds; every later version
of the pretraining core must reproduce them. On the machine that recorded them the match is exact, bit
for bit; the tolerance only leaves room for another CPU's floating-point kernels.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/test_albef_trace.py`` (about 90 s on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_shards.__main__ import main as data_shards_main
from tests.pretrain.conftest import REPO, free_port

pytestmark = pytest.mark.slow

# step: (loss, itc, itm, mlm), from `make demo`'s pretraining command with the overrides in run_trace().
RECORDED = {
    1: (19.961637496948242, 8.276937484741211, 0.6406744718551636, 11.044025421142578),
    2: (18.476619720458984, 7.5752153396606445, 0.6469232439994812, 10.25448226928711),
    3: (17.889001846313477, 6.650411605834961, 0.6475538015365601, 10.591036796569824),
    4: (15.872903823852539, 5.805598258972168, 0.6581519246101379, 9.409153938293457),
    5: (15.377616882324219, 5.794294834136963, 0.6621465682983398, 8.921175003051758),
    6: (14.441967010498047, 5.4322357177734375, 0.6453014612197876, 8.36443042755127),
    7: (13.55472183227539, 5.533764362335205, 0.6425832509994507, 7.3783745765686035),
    8: (13.392559051513672, 5.7776689529418945, 0.6375479102134705, 6.97734260559082),
    9: (12.281475067138672, 5.855971336364746, 0.6539133191108704, 5.771590232849121),
    10: (12.455835342407227, 6.006441593170166, 0.6465740203857422, 5.80281925201416),
    11: (11.671393394470215, 6.167616844177246, 0.6568811535835266, 4.846895217895508),
    12: (11.340225219726562, 6.17824649810791, 0.6291552186012268, 4.5328240394592285),
    13: (10.95329475402832, 6.140438556671143, 0.6479794979095459, 4.164876461029053),
    14: (11.389644622802734, 6.349535942077637, 0.6440725922584534, 4.396036148071289),
    15: (11.064031600952148, 6.3554229736328125, 0.6340935826301575, 4.074514389038086),
    16: (10.898712158203125, 6.274430751800537, 0.6488168835639954, 3.9754638671875),
    17: (11.187898635864258, 6.375187873840332, 0.6388720870018005, 4.173839092254639),
    18: (10.686639785766602, 6.283385753631592, 0.6391072273254395, 3.7641468048095703),
    19: (10.477667808532715, 6.301987648010254, 0.6308286190032959, 3.544851541519165),
    20: (10.584463119506836, 6.219239234924316, 0.6455336213111877, 3.7196905612945557),
}
TOLERANCE = 1e-4  # relative; 0 on the recording machine


def run_trace(shards: str, output: Path) -> dict[int, dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "--module", "pretrain", "--config", "pretrain/configs/demo.yaml",
               "--deepspeed_config", "ds_configs/zero0_fp32.json", "--output-dir", str(output), "--resume", "none",
               "--max-steps", "20", "--set", f"data.train=[{{urls: '{shards}'}}]", "--set", "run.log_every=1",
               "--set", "eval.retrieval_urls=null"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record for record in records if "step" in record}


def test_demo_pretraining_reproduces_the_recorded_losses(tmp_path):
    world = tmp_path / "world"
    assert data_shards_main(["synth", "--out", str(world), "--num-images", "240", "--seed", "0"]) == 0
    assert data_shards_main(["build", "--input", str(world / "annotations" / "pretrain_albef.json"), "--format",
                             "albef", "--image-root", str(world / "images"), "--output",
                             str(tmp_path / "shards" / "pretrain-%06d.tar"), "--samples-per-shard", "24",
                             "--workers", "1", "--seed", "0"]) == 0
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 8
    steps = run_trace(str(tmp_path / "shards" / "pretrain-{000000..000007}.tar"), tmp_path / "run")
    assert sorted(steps) == sorted(RECORDED)
    for step, expected in RECORDED.items():
        measured = tuple(steps[step][name] for name in ("loss", "itc", "itm", "mlm"))
        assert measured == pytest.approx(expected, rel=TOLERANCE), step
