"""Grounding metrics: Acc@IoU (and ALBEF's inclusive-pixel IoU), and proposal scoring against ALBEF's loop."""

from __future__ import annotations

import pytest
import torch

from finetune.metrics.grounding import accuracy_at_iou, pick_proposal, resize_heatmap, score_proposals
from pretrain.objectives.box import box_iou, xywh_to_xyxy


def random_boxes(generator: torch.Generator, count: int) -> torch.Tensor:
    corners = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 10
    sizes = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 5
    return torch.cat([corners, corners + sizes], dim=1)


def test_accuracy_at_iou_threshold_is_inclusive():
    ground_truth = torch.tensor([[0.0, 0, 1, 1]] * 4)
    predicted = torch.tensor([[0.0, 0, 1, 1], [0, 0, 2, 1], [0, 0, 2.01, 1], [5, 5, 6, 6]])  # IoU 1, .5, <.5, 0
    assert accuracy_at_iou(predicted, ground_truth) == 50.0
    assert accuracy_at_iou(predicted, ground_truth, threshold=0.4) == 75.0
    with pytest.raises(ValueError, match="no boxes"):
        accuracy_at_iou(torch.zeros(0, 4), torch.zeros(0, 4))


def albef_compute_iou(box1, box2) -> float:
    """ALBEF/refer's computeIoU on xywh boxes with inclusive pixel ends."""
    inter_x1, inter_y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1) if inter_x1 < inter_x2 and inter_y1 < inter_y2 else 0
    return inter / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def test_iou_equals_albef_inclusive_pixel_iou():
    generator = torch.Generator().manual_seed(3)
    for _ in range(300):
        first, second = (torch.randint(0, 20, (4,), generator=generator) + torch.tensor([0, 0, 1, 1])
                         for _ in range(2))
        overlap_x = min(first[0] + first[2], second[0] + second[2]) - max(first[0], second[0])
        overlap_y = min(first[1] + first[3], second[1] + second[3]) - max(first[1], second[1])
        if 0 < overlap_x <= 1 or 0 < overlap_y <= 1:
            continue  # the documented difference: ALBEF counts overlaps a pixel wide as none
        ours = box_iou(xywh_to_xyxy(first.double()), xywh_to_xyxy(second.double())).item()
        assert ours == pytest.approx(albef_compute_iou(first.tolist(), second.tolist()), abs=1e-6)


def albef_scores(mask: torch.Tensor, detections: list[list[float]], alpha: float) -> list[float]:
    """ALBEF grounding_eval's loop over xywh detections."""
    return [(mask[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** alpha).item()
            for x, y, w, h in detections]


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_proposal_scores_equal_albef_loop(alpha):
    generator = torch.Generator().manual_seed(4)
    mask = torch.rand(37, 53, generator=generator, dtype=torch.float64)
    detections = []
    for _ in range(40):
        x, y = (torch.rand(2, generator=generator, dtype=torch.float64) * torch.tensor([50.0, 34])).tolist()
        w, h = (torch.rand(2, generator=generator, dtype=torch.float64) * 20 + 0.5).tolist()
        detections.append([x, min(y, 36.0), min(w, 53 - x), min(h, 37 - y)])
    detections = [d for d in detections if d[2] > 0 and d[3] > 0]
    ours = score_proposals(mask, xywh_to_xyxy(torch.tensor(detections, dtype=torch.float64)), alpha)
    torch.testing.assert_close(ours, torch.tensor(albef_scores(mask, detections, alpha), dtype=torch.float64))


def test_pick_proposal_sum_mean_and_ties():
    heat = torch.zeros(10, 10)
    heat[1:3, 1:3] = 1.0    # a small hot spot
    heat[5:10, 0:10] = 0.3  # a large warm region
    proposals = torch.tensor([[1.0, 1, 3, 3], [0, 5, 10, 10]])
    assert pick_proposal(heat, proposals, area_exponent=0.0).tolist() == [0, 5, 10, 10]  # sum: 15 > 4
    assert pick_proposal(heat, proposals, area_exponent=1.0).tolist() == [1, 1, 3, 3]    # mean: 1 > 0.3
    assert pick_proposal(heat, proposals).tolist() == [0, 5, 10, 10]  # ALBEF's 0.5: 15/sqrt(50) > 4/2
    two_spots = torch.zeros(10, 10)
    two_spots[1:3, 1:3] = two_spots[6:8, 6:8] = 1.0
    tied = torch.tensor([[6.0, 6, 8, 8], [1, 1, 3, 3]])
    assert score_proposals(two_spots, tied).tolist() == [2.0, 2.0]
    assert pick_proposal(two_spots, tied).tolist() == [6, 6, 8, 8]  # the first on a tie


def test_proposals_clip_to_the_image_and_reject_empty_boxes():
    heat = torch.ones(4, 4)
    assert score_proposals(heat, torch.tensor([[-2.0, -2, 2, 2]]), 0.0).tolist() == [4.0]  # 2x2 pixels inside
    with pytest.raises(ValueError, match=r"proposal 1 \[2.0, 2.0, 2.0, 3.0\] has no area"):
        score_proposals(heat, torch.tensor([[0.0, 0, 1, 1], [2, 2, 2, 3]]))
    with pytest.raises(ValueError, match="no proposal"):
        score_proposals(heat, torch.zeros(0, 4))


def test_resize_heatmap():
    constant = resize_heatmap(torch.full((24, 24), 0.25), 100, 80)
    assert constant.shape == (100, 80)
    torch.testing.assert_close(constant, torch.full((100, 80), 0.25))
    peak = torch.zeros(4, 4)
    peak[0, 0] = 1.0
    resized = resize_heatmap(peak, 40, 40)
    assert resized[:10, :10].mean() > resized[30:, 30:].abs().mean()
