"""Box geometry and X-VLM's box head with its losses: what box regression needs in pretraining and fine-tuning.

Boxes are ``[..., 4]`` tensors in ``xyxy`` (left, top, right, bottom) unless a name says otherwise; ``xywh`` is
(left, top, width, height), the format of RefCOCO boxes and detections, and ``cxcywh`` (centre x, centre y,
width, height) is the target of the X-VLM box head (reference/methods.md section 1).

- ``box_iou`` and ``generalized_box_iou`` compare boxes pairwise along the leading dimensions (box ``i`` of the
  prediction with box ``i`` of the target) and are differentiable; ``generalized_box_iou_loss`` is ``1 - GIoU``.
- ``BoxHead`` is X-VLM's ``bbox_head`` on a fused [CLS]; ``box_losses`` its L1 + (1 - GIoU) terms over the
  samples that have a target box::

    predicted = BoxHead(hidden_size)(fused_cls)                    # sigmoid (cx, cy, w, h) over the image size
    losses = box_losses(predicted, xyxy_to_cxcywh(boxes) / image_size, valid)   # {"l1", "giou"}

Tests: ``.venv/bin/python -m pytest -q tests/pretrain/objectives/test_box.py``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import box_convert

_EPSILON = 1e-7  # keeps IoU and GIoU finite and differentiable for boxes of zero area, as torchvision does


def xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(torch.as_tensor(boxes), "xywh", "xyxy")


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(torch.as_tensor(boxes), "xyxy", "xywh")


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(torch.as_tensor(boxes), "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(torch.as_tensor(boxes), "xyxy", "cxcywh")


def _check_pair(predicted: torch.Tensor, target: torch.Tensor) -> None:
    if predicted.shape[-1:] != (4,) or predicted.shape != target.shape:
        raise ValueError(f"boxes must have matching shapes [..., 4]; got {tuple(predicted.shape)} "
                         f"and {tuple(target.shape)}")


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def intersection_union(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(predicted, target)
    top_left = torch.maximum(predicted[..., :2], target[..., :2])
    bottom_right = torch.minimum(predicted[..., 2:], target[..., 2:])
    overlap = (bottom_right - top_left).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    return intersection, _area(predicted) + _area(target) - intersection


def box_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted ``xyxy`` box with the target box at the same position: shape ``[...]``."""
    intersection, union = intersection_union(predicted, target)
    return intersection / (union + _EPSILON)


def generalized_box_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GIoU = IoU - (enclosing area - union) / enclosing area, pairwise as ``box_iou``; in [-1, 1]."""
    intersection, union = intersection_union(predicted, target)
    enclosing_top_left = torch.minimum(predicted[..., :2], target[..., :2])
    enclosing_bottom_right = torch.maximum(predicted[..., 2:], target[..., 2:])
    enclosing = _area(torch.cat([enclosing_top_left, enclosing_bottom_right], dim=-1))
    return intersection / (union + _EPSILON) - (enclosing - union) / (enclosing + _EPSILON)


def generalized_box_iou_loss(predicted: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``1 - GIoU`` of ``xyxy`` box pairs; ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    loss = 1 - generalized_box_iou(predicted, target)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")


class BoxHead(nn.Module):
    """X-VLM's ``bbox_head``: Linear(H, 2H) -> LayerNorm -> GELU -> Linear(2H, 4), sigmoid (cx, cy, w, h)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.LayerNorm(2 * hidden_size),
                                    nn.GELU(), nn.Linear(2 * hidden_size, 4))

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        return self.layers(fused_cls).sigmoid()


def box_losses(predicted: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict:
    """X-VLM's box losses over the ``valid`` samples: L1 summed over the 4 normalised cxcywh coordinates, and
    1 - GIoU of the boxes, each averaged over the valid samples (zero, with a graph, when none is)."""
    weights = valid.to(predicted.dtype)
    count = weights.sum().clamp(min=1)
    l1 = (predicted - target).abs().sum(dim=-1)
    giou = 1 - generalized_box_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(target))
    return {"l1": (l1 * weights).sum() / count, "giou": (giou * weights).sum() / count}
