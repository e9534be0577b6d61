"""The region student of open-vocabulary region distillation (ViLD, Gu et al., 2022, "Open-vocabulary Object
Detection via Vision and Language Knowledge Distillation"): a ViT image tower whose last patch tokens are pooled per
box (RoIAlign over the token grid into k x k bins, models/regions.py), each bin layer-normed, the bins mapped by a
two-layer head (Fast R-CNN's "2fc" box head) into the teacher's embedding space and L2-normalized, plus a learned background embedding in that space. Regions are classified by cosine similarity
against the teacher's text embeddings of class names (and the background embedding), so classes never seen
labelled are recognized through their names.

Saved as a folder: `vision/` (a plain transformers `CLIPVisionModel`, safetensors), `region_head.safetensors`
(head and background) and `region.json` (embedding size, pooling, image normalization)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel, CLIPVisionModel

from vldistill.fileio import atomic_directory
from vldistill.models.inputs import CLIP_MEAN, CLIP_STD
from vldistill.models.regions import roi_align, token_grid
from vldistill.models.signals import Signals

REGION_FILE = "region.json"
HEAD_FILE = "region_head.safetensors"
VISION_FOLDER = "vision"
FORMAT = "vldistill-region-student"


def vision_at_size(vision: CLIPVisionModel, image_size: int) -> CLIPVisionModel:
    """A copy of a CLIP image tower that takes `image_size` images: its position embeddings interpolated
    (bicubic, as transformers' `interpolate_pos_encoding`) to the new patch grid, every other weight kept."""
    patch = vision.config.patch_size
    if image_size % patch:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
    config = copy.deepcopy(vision.config)
    config.image_size = image_size
    resized = CLIPVisionModel(config)
    state = vision.state_dict()
    embeddings = vision.embeddings
    tokens = torch.zeros(1, 1 + (image_size // patch) ** 2, config.hidden_size)
    with torch.no_grad():
        positions = embeddings.interpolate_pos_encoding(tokens, image_size, image_size)[0]
    state["embeddings.position_embedding.weight"] = positions.clone()
    resized.load_state_dict(state)
    return resized


def image_tower_of(model: nn.Module) -> CLIPVisionModel:
    """The image tower of a CLIP dual encoder (a `CLIPModel` inside a vldistill adapter) as a `CLIPVisionModel`
    with the same weights (a copy)."""
    clip = getattr(model, "model", model)
    if not isinstance(clip, CLIPModel):
        raise ValueError(f"a region student starts from a CLIP image tower; {type(model).__name__} is not a CLIP model")
    return copy.deepcopy(clip.vision_model)


class RegionStudent(nn.Module):
    """Region embeddings from an image tower (see the module docstring)."""

    def __init__(
        self,
        vision: CLIPVisionModel,
        embed_dim: int,
        pool_size: int = 2,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
        head_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.vision = vision
        self.embed_dim, self.pool_size = int(embed_dim), int(pool_size)
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.head_dim = int(head_dim or 2 * self.embed_dim)
        self.head = nn.Sequential(  # Fast R-CNN's two-layer box head over the k x k bins, into the embedding space
            nn.Linear(vision.config.hidden_size * self.pool_size**2, self.head_dim), nn.GELU(), nn.Linear(self.head_dim, self.embed_dim),
        )
        self.background = nn.Parameter(F.normalize(torch.randn(self.embed_dim), dim=0))

    @classmethod
    def from_dual_encoder(cls, model: nn.Module, embed_dim: int, image_size: int, pool_size: int = 2) -> "RegionStudent":
        """A region student on a copy of a CLIP dual encoder's image tower, resized to `image_size` images, with a
        new head into `embed_dim` (the teacher's embedding size) and background embedding (from the global RNG)."""
        vision = vision_at_size(image_tower_of(model), image_size)
        return cls(vision, embed_dim, pool_size, getattr(model, "image_mean", CLIP_MEAN), getattr(model, "image_std", CLIP_STD))

    @property
    def image_size(self) -> int:
        """Side of the square images the tower takes."""
        return int(self.vision.config.image_size)

    @property
    def patch_size(self) -> int:
        """Side of a patch in pixels: one token of the grid the boxes are pooled on."""
        return int(self.vision.config.patch_size)

    def embed_regions(self, pixel_values: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """(R, D) L2-normalized embeddings of the boxes (R, 4) (pixels) on the images `batch_index` (R,) names."""
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        grid = token_grid(hidden, self.image_size, self.patch_size)
        pooled = roi_align(grid, boxes, batch_index, 1.0 / self.patch_size, self.pool_size)  # (R, W, k, k)
        bins = self.vision.post_layernorm(pooled.flatten(2).transpose(1, 2))  # (R, k*k, W), each bin layer-normed
        return F.normalize(self.head(bins.flatten(1)), dim=-1)

    def background_embedding(self) -> torch.Tensor:
        """(D,) the learned background embedding, L2-normalized."""
        return F.normalize(self.background, dim=0)

    def forward(
        self,
        pixel_values: torch.Tensor,
        region_boxes: torch.Tensor,
        region_image: torch.Tensor,
        region_labels: Optional[torch.Tensor] = None,
    ) -> Signals:
        """The batch's region signals: `region_embeds` of its boxes, the `region_labels` it was given (passed on for
        the losses) and the `region_background` embedding."""
        return Signals(
            region_embeds=self.embed_regions(pixel_values, region_boxes, region_image),
            region_labels=region_labels,
            region_background=self.background_embedding(),
        )

    def region_record(self) -> dict[str, Any]:
        """What `region.json` holds: the format, embedding size, pooling and image normalization."""
        return {
            "format": FORMAT, "embed_dim": self.embed_dim, "pool_size": self.pool_size, "head_dim": self.head_dim,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
        }

    def save_pretrained(self, out_dir: str | os.PathLike, metadata: Optional[dict[str, Any]] = None) -> Path:
        """Write the folder (see the module docstring; `metadata` into region.json under "metadata") atomically."""
        with atomic_directory(out_dir) as tmp:
            self.vision.save_pretrained(tmp / VISION_FOLDER)
            head = {**{f"head.{name}": tensor for name, tensor in self.head.state_dict().items()}, "background": self.background}
            save_file({name: tensor.detach().contiguous().cpu() for name, tensor in head.items()}, str(tmp / HEAD_FILE))
            record = {**self.region_record(), **({"metadata": metadata} if metadata else {})}
            (tmp / REGION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return Path(out_dir)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "RegionStudent":
        """A region student saved by `save_pretrained`; ValueError naming what is missing or wrong."""
        folder = Path(folder)
        record_path = folder / REGION_FILE
        if not record_path.is_file():
            raise ValueError(f"{folder} is not a region student folder: {REGION_FILE} is missing")
        record = json.loads(record_path.read_text())
        if record.get("format") != FORMAT:
            raise ValueError(f"{record_path}: format {record.get('format')!r} is not {FORMAT!r}")
        student = cls(
            CLIPVisionModel.from_pretrained(folder / VISION_FOLDER), record["embed_dim"], record["pool_size"],
            tuple(record["image_mean"]), tuple(record["image_std"]), record["head_dim"],
        )
        head = load_file(str(folder / HEAD_FILE))
        student.head.load_state_dict({name.removeprefix("head."): tensor for name, tensor in head.items() if name.startswith("head.")})
        with torch.no_grad():
            student.background.copy_(head["background"])
        return student
