"""Box geometry and X-VLM's box losses: formats, IoU and GIoU on known boxes and against torchvision's pairwise
versions, the GIoU loss and its gradient, L1 + (1 - GIoU) over the samples with a target."""

from __future__ import annotations

import pytest
import torch
import torchvision.ops

from pretrain.objectives.box import (
    box_iou,
    box_losses,
    cxcywh_to_xyxy,
    generalized_box_iou,
    generalized_box_iou_loss,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def random_boxes(generator: torch.Generator, count: int) -> torch.Tensor:
    corners = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 10
    sizes = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 5
    return torch.cat([corners, corners + sizes], dim=1)


def test_conversions():
    assert xywh_to_xyxy(torch.tensor([10.0, 20, 30, 40])).tolist() == [10, 20, 40, 60]
    assert xyxy_to_xywh(torch.tensor([10.0, 20, 40, 60])).tolist() == [10, 20, 30, 40]
    assert cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 1.0, 1.0])).tolist() == [0, 0, 1, 1]
    assert xyxy_to_cxcywh(torch.tensor([[0.0, 0, 2, 4]])).tolist() == [[1, 2, 2, 4]]
    boxes = random_boxes(torch.Generator().manual_seed(0), 8)
    torch.testing.assert_close(xywh_to_xyxy(xyxy_to_xywh(boxes)), boxes)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(boxes)), boxes)


def test_iou_and_giou_known_values():
    first = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 1]])
    second = torch.tensor([[1.0, 1, 3, 3], [0, 0, 1, 1], [2, 0, 3, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(box_iou(first, second), torch.tensor([1 / 7, 1, 0, 0.5]))
    # enclosing boxes: 3x3 (area 9, union 7), the box itself, 3x1 (union 2), 2x1 (union 2)
    torch.testing.assert_close(generalized_box_iou(first, second), torch.tensor([1 / 7 - 2 / 9, 1, -1 / 3, 0.5]))


def test_equal_to_torchvision_pairwise_diagonal():
    generator = torch.Generator().manual_seed(1)
    predicted, target = random_boxes(generator, 64), random_boxes(generator, 64)
    torch.testing.assert_close(box_iou(predicted, target), torchvision.ops.box_iou(predicted, target).diagonal())
    torch.testing.assert_close(generalized_box_iou(predicted, target),
                               torchvision.ops.generalized_box_iou(predicted, target).diagonal())
    for reduction in ("none", "mean", "sum"):
        torch.testing.assert_close(generalized_box_iou_loss(predicted, target, reduction),
                                   torchvision.ops.generalized_box_iou_loss(predicted, target, reduction=reduction))


def test_batched_shapes_and_gradient():
    generator = torch.Generator().manual_seed(2)
    predicted = random_boxes(generator, 12).reshape(3, 4, 4).requires_grad_()
    target = random_boxes(generator, 12).reshape(3, 4, 4)
    assert box_iou(predicted, target).shape == (3, 4)
    assert generalized_box_iou_loss(predicted, target, "none").shape == (3, 4)
    assert torch.autograd.gradcheck(lambda boxes: generalized_box_iou_loss(boxes, target), (predicted,))
    # disjoint boxes still get a gradient that pulls them together (GIoU's point over IoU)
    apart = torch.tensor([[0.0, 0, 1, 1]], requires_grad=True)
    generalized_box_iou_loss(apart, torch.tensor([[2.0, 0, 3, 1]])).backward()
    assert apart.grad[0, 2] < 0  # moving the right edge right lowers the loss


def test_mismatched_shapes_and_reduction():
    with pytest.raises(ValueError, match="matching shapes"):
        box_iou(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        generalized_box_iou_loss(torch.zeros(1, 4), torch.zeros(1, 4), "max")


def test_box_losses_match_torchvision_and_skip_invalid_samples():
    predicted = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1], [0.2, 0.2, 0.3, 0.3]])
    target = torch.tensor([[0.4, 0.5, 0.3, 0.3], [0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    losses = box_losses(predicted, target, valid)

    def xyxy(boxes):
        return torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=1)

    giou = torchvision.ops.generalized_box_iou(xyxy(predicted[:2]), xyxy(target[:2])).diagonal()
    assert losses["l1"].item() == pytest.approx((predicted[:2] - target[:2]).abs().sum().item() / 2, rel=1e-6)
    assert losses["giou"].item() == pytest.approx((1 - giou).mean().item(), rel=1e-5)
    none = box_losses(predicted, target, torch.zeros(3, dtype=torch.bool))
    assert none["l1"].item() == 0.0 and none["giou"].item() == 0.0
