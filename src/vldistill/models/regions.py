"""Region features from a vision tower's token grid (ViLD's region embeddings, issue 16), without torchvision.

`roi_align` is RoIAlign (He et al., 2017, "Mask R-CNN") with `aligned=True` and one sample per bin: each box, in
image pixels, is mapped onto the (H, W) feature grid by `spatial_scale` (1 / patch size for a ViT), split into
k x k bins, and each bin takes the bilinear interpolation of the grid at its centre (grid cell centres at
index + 0.5, as torchvision's aligned RoIAlign places them), computed with `grid_sample`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def roi_align(
    features: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor, spatial_scale: float, output_size: int
) -> torch.Tensor:
    """(N, C, k, k) features of N boxes (N, 4) (x0, y0, x1, y1 in image pixels) on the (B, C, H, W) `features`
    of the images `batch_index` (N,) names, k = `output_size` (see the module docstring)."""
    if boxes.ndim != 2 or boxes.shape[1] != 4 or batch_index.shape != (boxes.shape[0],):
        raise ValueError(f"need boxes (N, 4) and batch_index (N,), got {tuple(boxes.shape)} and {tuple(batch_index.shape)}")
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")
    height, width = features.shape[-2:]
    steps = (torch.arange(output_size, dtype=features.dtype, device=features.device) + 0.5) / output_size
    scaled = boxes.to(features.dtype) * spatial_scale
    xs = scaled[:, 0:1] + steps * (scaled[:, 2:3] - scaled[:, 0:1])  # (N, k) bin centres on the grid
    ys = scaled[:, 1:2] + steps * (scaled[:, 3:4] - scaled[:, 1:2])
    grid = torch.stack(  # grid_sample's (x, y) in [-1, 1] over the grid's edges (align_corners=False)
        [
            (2 * xs / width - 1)[:, None, :].expand(-1, output_size, -1),
            (2 * ys / height - 1)[:, :, None].expand(-1, -1, output_size),
        ],
        dim=-1,
    )
    return F.grid_sample(features[batch_index], grid, mode="bilinear", padding_mode="border", align_corners=False)


def token_grid(hidden_state: torch.Tensor, image_size: int, patch_size: int, prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT's last hidden state (B, prefix + H*W, C) as its patch-token grid (B, C, H, W), the `prefix_tokens`
    (CLIP's CLS token) left out."""
    side = image_size // patch_size
    tokens = hidden_state[:, prefix_tokens:]
    if tokens.shape[1] != side * side:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not form a {side} x {side} grid ({image_size} px, patch {patch_size})")
    return tokens.transpose(1, 2).reshape(hidden_state.shape[0], -1, side, side)
