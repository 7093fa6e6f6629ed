"""Grounding metrics: Acc@IoU and ALBEF's Grad-CAM proposal picking (box geometry: ``pretrain.objectives.box``).

Boxes are ``[..., 4]`` tensors in ``xyxy`` (left, top, right, bottom) unless a name says otherwise.

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

from pretrain.objectives.box import intersection_union


def accuracy_at_iou(predicted_boxes: torch.Tensor, ground_truth_boxes: torch.Tensor,
                    threshold: float = 0.5) -> float:
    """Percentage of ``xyxy`` predictions whose IoU with their ground truth is at least ``threshold``."""
    predicted, ground_truth = torch.as_tensor(predicted_boxes), torch.as_tensor(ground_truth_boxes)
    if predicted.numel() == 0:
        raise ValueError("accuracy_at_iou got no boxes; the evaluation split is empty")
    intersection, union = intersection_union(predicted.double().reshape(-1, 4), ground_truth.double().reshape(-1, 4))
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
