"""RoIAlign over a token grid (models/regions.py) against hand-worked bilinear values."""

from __future__ import annotations

import pytest
import torch

from vldistill.models.regions import roi_align, token_grid


def test_roi_align_matches_hand_worked_bilinear_values():
    # a 2 x 2 grid of a 16-pixel image with 8-pixel patches: cell centres at pixels 4 and 12
    grid = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[10.0, 20.0], [30.0, 40.0]]]])  # (B=2, C=1, 2, 2)
    boxes = torch.tensor([
        [0.0, 0.0, 16.0, 16.0],   # k=2 bins centred on the four cells: the grid itself
        [0.0, 0.0, 16.0, 16.0],   # image 1, the same box
    ])
    out = roi_align(grid, boxes, torch.tensor([0, 1]), spatial_scale=1 / 8, output_size=2)
    assert torch.allclose(out[0, 0], grid[0, 0]) and torch.allclose(out[1, 0], grid[1, 0])
    one = roi_align(grid, torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 12.0, 8.0]]),
                    torch.tensor([0, 0, 0]), spatial_scale=1 / 8, output_size=1)[:, 0, 0, 0]
    # centre (8, 8): all four cells equally -> 1.5; centre (4, 4): cell (0, 0) -> 0;
    # centre x 8, y 6: halfway in x, a quarter of the way from row 0 to row 1 in y -> 0.75 * 0.5 + 0.25 * 2.5 = 1.0
    assert one.tolist() == pytest.approx([1.5, 0.0, 1.0])


def test_token_grid_drops_the_cls_token_and_keeps_row_major_order():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # CLS + 2 x 2 patches, 3 channels
    grid = token_grid(hidden, image_size=16, patch_size=8)
    assert grid.shape == (2, 3, 2, 2)
    assert torch.equal(grid[0, :, 0, 1], hidden[0, 2]) and torch.equal(grid[1, :, 1, 0], hidden[1, 3])
    with pytest.raises(ValueError, match="do not form"):
        token_grid(hidden, image_size=24, patch_size=8)
    with pytest.raises(ValueError, match="boxes"):
        roi_align(grid, torch.zeros(3), torch.zeros(3, dtype=torch.long), 1.0, 1)
