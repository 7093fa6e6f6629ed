"""Tests for pretrain/objectives/itc.py against explicit per-row loops in float64.

Run: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_itc.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.objectives.itc import ITCOutput, contrastive_loss_in_batch, itc_loss, retrieval_positives
from tests.pretrain.objectives.test_distributed import spawn_gloo

BATCH, DIM, QUEUE = 3, 4, 5


def _unit(*shape, seed, dim=-1):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


def _inputs(queue=QUEUE):
    return {
        "image_feat": _unit(BATCH, DIM, seed=1).requires_grad_(True),
        "text_feat": _unit(BATCH, DIM, seed=2).requires_grad_(True),
        "image_feat_m": _unit(BATCH, DIM, seed=3).requires_grad_(True),
        "text_feat_m": _unit(BATCH, DIM, seed=4).requires_grad_(True),
        "image_queue": _unit(DIM, queue, seed=5, dim=0).requires_grad_(True),
        "text_queue": _unit(DIM, queue, seed=6, dim=0).requires_grad_(True),
        "temp": torch.tensor(0.07, requires_grad=True),
    }


def _loop_direction(online, momentum, columns, temp, alpha, positives):
    """-sum_j target_j * log p_j for each row, written out with Python loops; returns the row mean."""
    total = 0.0
    temp_value = float(temp.detach())
    for row in range(online.shape[0]):
        logits = [sum(online[row, d] * columns[d, j] for d in range(DIM)) / temp for j in range(columns.shape[1])]
        log_normaliser = torch.log(sum(torch.exp(logit) for logit in logits))
        momentum_logits = [float(momentum[row] @ columns[:, j]) / temp_value for j in range(columns.shape[1])]
        momentum_normaliser = sum(math.exp(value) for value in momentum_logits)
        if positives is None:
            hard = [1.0 if j == row else 0.0 for j in range(columns.shape[1])]
        else:
            count = sum(bool(value) for value in positives[row])
            hard = [float(bool(value)) / count for value in positives[row]]
        for j, logit in enumerate(logits):
            target = alpha * math.exp(momentum_logits[j]) / momentum_normaliser + (1 - alpha) * hard[j]
            total = total - target * (logit - log_normaliser)
    return total / online.shape[0]


def _loop_itc(inputs, alpha, positives=None):
    as64 = {key: value.double() for key, value in inputs.items()}
    text_columns = torch.cat([as64["text_feat_m"].T, as64["text_queue"]], dim=1).detach()
    image_columns = torch.cat([as64["image_feat_m"].T, as64["image_queue"]], dim=1).detach()
    temp = as64["temp"]
    i2t = _loop_direction(as64["image_feat"], as64["image_feat_m"].detach(), text_columns, temp, alpha, positives)
    t2i = _loop_direction(as64["text_feat"], as64["text_feat_m"].detach(), image_columns, temp, alpha, positives)
    return (i2t + t2i) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_equals_the_loop_formula_with_a_queue(alpha):
    output = itc_loss(**_inputs(), alpha=alpha)
    assert isinstance(output, ITCOutput)
    expected = _loop_itc(_inputs(), alpha)
    torch.testing.assert_close(output.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert output.sim_i2t.shape == output.sim_t2i.shape == (BATCH, BATCH + QUEUE)


def test_multi_positive_targets_equal_the_loop_formula():
    ids = torch.tensor([4, 7, 4])
    queue_ids = torch.tensor([[7, -100, 4, 9, -100]])
    positives = retrieval_positives(ids, queue_ids)
    for alpha in (0.0, 0.4):
        output = itc_loss(**_inputs(), alpha=alpha, positives=positives)
        expected = _loop_itc(_inputs(), alpha, positives.tolist())
        torch.testing.assert_close(output.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)


def test_retrieval_positives_marks_same_image_columns():
    positives = retrieval_positives(torch.tensor([4, 7, 4]), torch.tensor([[7, -100]]))
    assert positives.tolist() == [
        [True, False, True, False, False],
        [False, True, False, True, False],
        [True, False, True, False, False],
    ]
    assert retrieval_positives(torch.tensor([1, 2])).tolist() == [[True, False], [False, True]]


def test_gradients_reach_online_features_and_temp_only():
    inputs = _inputs()
    itc_loss(**inputs, alpha=0.4).loss.backward()
    for name in ("image_feat", "text_feat", "temp"):
        assert inputs[name].grad is not None and bool(inputs[name].grad.abs().sum() > 0), name
    for name in ("image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        assert inputs[name].grad is None, name
    reference = _inputs()
    _loop_itc(reference, 0.4).backward()
    torch.testing.assert_close(inputs["image_feat"].grad, reference["image_feat"].grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inputs["temp"].grad, reference["temp"].grad.float(), rtol=1e-4, atol=1e-5)


def test_in_batch_similarities_are_the_first_columns():
    output = itc_loss(**_inputs(), alpha=0.4)
    assert torch.equal(output.in_batch_sim_i2t, output.sim_i2t[:, :BATCH])
    inputs = _inputs()
    expected = inputs["text_feat"] @ inputs["image_feat_m"].T / inputs["temp"]
    torch.testing.assert_close(output.in_batch_sim_t2i, expected)


def test_empty_queue_and_bf16_features():
    output = itc_loss(**_inputs(queue=0), alpha=0.4)
    torch.testing.assert_close(output.loss.double(), _loop_itc(_inputs(queue=0), 0.4).detach(), rtol=1e-5, atol=1e-6)
    low = {key: value.detach().bfloat16() if key != "temp" else value for key, value in _inputs().items()}
    rounded = {key: value.float() for key, value in low.items()}
    low_output = itc_loss(**low, alpha=0.4)
    assert low_output.loss.dtype == torch.float32
    torch.testing.assert_close(low_output.loss, itc_loss(**rounded, alpha=0.4).loss)


def test_bad_inputs_raise_clear_errors():
    inputs = _inputs()
    with pytest.raises(ValueError, match="at least one True"):
        itc_loss(**inputs, alpha=0.0, positives=torch.zeros(BATCH, BATCH + QUEUE, dtype=torch.bool))
    with pytest.raises(ValueError, match="positives must be"):
        itc_loss(**inputs, alpha=0.0, positives=torch.ones(BATCH, BATCH, dtype=torch.bool))
    with pytest.raises(ValueError, match="alpha"):
        itc_loss(**inputs, alpha=1.5)
    inputs["text_feat_m"] = inputs["text_feat_m"][:2]
    with pytest.raises(ValueError, match="text_feat_m"):
        itc_loss(**inputs, alpha=0.0)


def _loop_in_batch(image_feat, text_feat, temp):
    total = 0.0
    for features, others in ((image_feat, text_feat), (text_feat, image_feat)):
        for row in range(features.shape[0]):
            logits = [features[row] @ others[column] / temp for column in range(others.shape[0])]
            total = total - (logits[row] - torch.log(sum(torch.exp(logit) for logit in logits))) / features.shape[0]
    return total / 2


def test_in_batch_contrastive_loss_equals_the_loop_formula():
    image_feat, text_feat = _unit(4, DIM, seed=11), _unit(4, DIM, seed=12)
    loss = contrastive_loss_in_batch(image_feat, text_feat, 0.1)
    torch.testing.assert_close(loss.double(), _loop_in_batch(image_feat.double(), text_feat.double(), 0.1))


def _global_pairs():
    return _unit(6, DIM, seed=21), _unit(6, DIM, seed=22)


def _in_batch_worker(rank: int, world_size: int) -> dict:
    image_feat, text_feat = _global_pairs()
    rows = slice(rank * 3, (rank + 1) * 3)
    local_image = image_feat[rows].clone().requires_grad_(True)
    local_text = text_feat[rows].clone().requires_grad_(True)
    loss = contrastive_loss_in_batch(local_image, local_text, 0.1)
    loss.backward()
    return {"loss": loss.detach(), "image_grad": local_image.grad, "text_grad": local_text.grad}


def test_in_batch_contrastive_loss_over_two_ranks_matches_one_process(tmp_path):
    results = spawn_gloo(_in_batch_worker, tmp_path)
    image_feat, text_feat = (tensor.requires_grad_(True) for tensor in _global_pairs())
    loss = contrastive_loss_in_batch(image_feat, text_feat, 0.1)
    loss.backward()
    torch.testing.assert_close(sum(result["loss"] for result in results) / 2, loss.detach())
    for rank, result in enumerate(results):
        rows = slice(rank * 3, (rank + 1) * 3)
        # Each rank's loss is a mean over half the rows, so its gradients are twice those of the global mean.
        torch.testing.assert_close(result["image_grad"], 2 * image_feat.grad[rows])
        torch.testing.assert_close(result["text_grad"], 2 * text_feat.grad[rows])
