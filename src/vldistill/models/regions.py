"""Region features from a vision tower's token grid (ViLD's region embeddings, issue 16), without torchvision.

`roi_align` is RoIAlign (He et al., 2017, "Mask R-CNN") with `aligned=True` and one sample per bin: each box, in
image pixels, is mapped onto the (H, W) feature grid by `spatial_scale` (1 / patch size for a ViT), split into
k x k bins, and each bin takes the bilinear interpolation of the grid at its centre (grid cell centres at
index + 0.5, as torchvision's aligned RoIAlign places them), computed with `grid_sample`.

It also registers the signals region training passes around (models/signals.py): the student's `region_embeds`,
`region_labels` and `region_background`, and the teacher's `region_crop_embeds`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vldistill.models.signals import SignalKind, cat_rows, first, primary, register_signal


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


# --- what region training passes between the region student, the teacher's crops and the losses --------------

NO_TEACHER_SIDE = "which only the region student computes, never a teacher"

REGION_EMBEDS = register_signal(SignalKind(
    name="region_embeds",
    description="(R, D) L2-normalized embeddings of a batch's regions (the region student's RoI-pooled tokens, projected)",
    concat=cat_rows,
    combine=primary,
    primary_only=True,
    cache_refusal=NO_TEACHER_SIDE,
))
REGION_LABELS = register_signal(SignalKind(
    name="region_labels",
    description="(R,) each region's class among the run's training classes, that count for background, -1 for none",
    concat=cat_rows,
    combine=primary,
    primary_only=True,
    cache_refusal=NO_TEACHER_SIDE,
))
REGION_BACKGROUND = register_signal(SignalKind(
    name="region_background",
    description="(D,) the region student's learned background embedding, L2-normalized",
    concat=first,
    combine=primary,
    primary_only=True,
    cache_refusal=NO_TEACHER_SIDE,
))
REGION_CROP_EMBEDS = register_signal(SignalKind(
    name="region_crop_embeds",
    description="(R, D) the teacher's L2-normalized image embeddings of the batch's regions cropped and resized (ViLD-image)",
    concat=cat_rows,
    combine=primary,
    primary_only=True,
    cache_refusal="which the region crop cache (teachers/cache/regions.py) holds, one row per region rather than per sample",
))
