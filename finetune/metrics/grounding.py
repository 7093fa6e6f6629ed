"""Box metrics and losses for visual grounding: IoU, GIoU, Acc@IoU, box formats, Grad-CAM proposal picking.

Boxes are ``[..., 4]`` tensors in ``xyxy`` (left, top, right, bottom) unless a name says otherwise; ``xywh`` is
(left, top, width, height), the format of RefCOCO boxes and detections, and ``cxcywh`` (centre x, centre y,
width, height) is the target of the X-VLM box head (reference/methods.md section 1).

- ``box_iou`` and ``generalized_box_iou`` compare boxes pairwise along the leading dimensions (box ``i`` of the
  prediction with box ``i`` of the target) and are differentiable; ``generalized_box_iou_loss`` is ``1 - GIoU``,
  the X-VLM box loss term added to the L1 distance of the ``cxcywh`` coordinates.
- ``accuracy_at_iou`` is the grounding metric of ALBEF and X-VLM: the percentage of predictions whose IoU with
  the ground truth is at least 0.5. ALBEF's ``computeIoU`` counts inclusive pixels (``x2 = x + w - 1``), which
  gives the same value as the continuous IoU of ``(x, y, x + w, y + h)`` except that overlaps one pixel wide or
  less count as none.
- ``score_proposals`` and ``pick_proposal`` are ALBEF's weakly supervised ``grounding_eval``: the Grad-CAM map,
  resized to the image with ``resize_heatmap``, scores each proposal box by the heat it covers divided by
  ``area ** 0.5`` (``area_exponent`` 0 gives the sum of heat, 1 its mean); the best-scoring box is the prediction.

Weakly supervised grounding of one expression, then the split's accuracy::

    heat = resize_heatmap(gradcam_24x24, image_height, image_width)
    predicted.append(pick_proposal(heat, xywh_to_xyxy(detections)))
    accuracy = accuracy_at_iou(torch.stack(predicted), xywh_to_xyxy(reference_boxes))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _intersection_union(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair(predicted, target)
    top_left = torch.maximum(predicted[..., :2], target[..., :2])
    bottom_right = torch.minimum(predicted[..., 2:], target[..., 2:])
    overlap = (bottom_right - top_left).clamp(min=0)
    intersection = overlap[..., 0] * overlap[..., 1]
    return intersection, _area(predicted) + _area(target) - intersection


def box_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each predicted ``xyxy`` box with the target box at the same position: shape ``[...]``."""
    intersection, union = _intersection_union(predicted, target)
    return intersection / (union + _EPSILON)


def generalized_box_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GIoU = IoU - (enclosing area - union) / enclosing area, pairwise as ``box_iou``; in [-1, 1]."""
    intersection, union = _intersection_union(predicted, target)
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


def accuracy_at_iou(predicted_boxes: torch.Tensor, ground_truth_boxes: torch.Tensor,
                    threshold: float = 0.5) -> float:
    """Percentage of ``xyxy`` predictions whose IoU with their ground truth is at least ``threshold``."""
    predicted, ground_truth = torch.as_tensor(predicted_boxes), torch.as_tensor(ground_truth_boxes)
    if predicted.numel() == 0:
        raise ValueError("accuracy_at_iou got no boxes; the evaluation split is empty")
    intersection, union = _intersection_union(predicted.double().reshape(-1, 4), ground_truth.double().reshape(-1, 4))
    # exact IoU (no epsilon), so a pair at exactly the threshold counts
    iou = torch.where(union > 0, intersection / union.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return 100.0 * (iou >= threshold).double().mean().item()


def resize_heatmap(heatmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of a ``[h, w]`` Grad-CAM map to the image's ``[height, width]``, as ALBEF does."""
    heatmap = torch.as_tensor(heatmap, dtype=torch.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be [h, w], got shape {tuple(heatmap.shape)}")
    return F.interpolate(heatmap[None, None], size=(height, width), mode="bicubic", align_corners=False)[0, 0]


def score_proposals(heatmap: torch.Tensor, proposals: torch.Tensor, area_exponent: float = 0.5) -> torch.Tensor:
    """Score ``[P]`` of each ``xyxy`` proposal: heat summed over its pixels divided by ``area ** area_exponent``.

    ``heatmap`` is ``[height, width]`` at image resolution. A box covers rows ``int(top):int(bottom)`` and
    columns ``int(left):int(right)``, clipped to the image, and its area is ``width * height`` of the box, as in
    ALBEF's ``grounding_eval``. Box sums come from a summed-area table, so every proposal costs the same.
    """
    heatmap = torch.as_tensor(heatmap)
    proposals = torch.as_tensor(proposals).to(device=heatmap.device, dtype=torch.float64).reshape(-1, 4)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be [height, width] at image resolution, got shape {tuple(heatmap.shape)}")
    if proposals.shape[0] == 0:
        raise ValueError("score_proposals got no proposal box")
    height, width = heatmap.shape
    summed_area = F.pad(heatmap.double().cumsum(0).cumsum(1), (1, 0, 1, 0))
    pixels = proposals.trunc().long()  # int() of ALBEF's slice bounds
    left, right = pixels[:, 0].clamp(0, width), pixels[:, 2].clamp(0, width)
    top, bottom = pixels[:, 1].clamp(0, height), pixels[:, 3].clamp(0, height)
    right, bottom = torch.maximum(right, left), torch.maximum(bottom, top)
    heat = (summed_area[bottom, right] - summed_area[top, right] - summed_area[bottom, left]
            + summed_area[top, left])
    area = (proposals[:, 2] - proposals[:, 0]) * (proposals[:, 3] - proposals[:, 1])
    if (area <= 0).any():
        index = int(torch.nonzero(area <= 0)[0])
        raise ValueError(f"proposal {index} {proposals[index].tolist()} has no area; boxes must be xyxy with "
                         "right > left and bottom > top")
    return heat / area.pow(area_exponent)


def pick_proposal(heatmap: torch.Tensor, proposals: torch.Tensor, area_exponent: float = 0.5) -> torch.Tensor:
    """The ``xyxy`` proposal with the highest ``score_proposals`` score (the first one on a tie)."""
    proposals = torch.as_tensor(proposals).reshape(-1, 4)
    return proposals[int(torch.argmax(score_proposals(heatmap, proposals, area_exponent)))]
