"""Region distillation losses of ViLD (Gu et al., 2022, "Open-vocabulary Object Detection via Vision and Language
Knowledge Distillation"): a region student's embeddings of boxes (models/region_student.py) learn from the
teacher's image embeddings of the cropped regions (ViLD-image) and from its text embeddings of the base class
names (ViLD-text)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vldistill.losses.base import LOSSES, DistillLoss, LossContext, TemperatureParams
from vldistill.models.regions import REGION_BACKGROUND, REGION_CROP_EMBEDS, REGION_EMBEDS, REGION_LABELS

DISTANCES = ("l1", "cosine")


@LOSSES.register("region_image")
class RegionImageDistill(DistillLoss):
    """ViLD-image: each region embedding e_r (L2-normalized) is pulled to the teacher's L2-normalized image
    embedding t_r of that region cropped and resized, over every region of the batch (objects of any class, and
    background boxes): `l1` (the paper's) mean_r ||e_r - t_r||_1, or `cosine` mean_r (1 - e_r . t_r). The crops'
    embeddings are computed once and read from the region crop cache (teachers/cache/regions.py)."""

    needs = frozenset({REGION_CROP_EMBEDS.name})
    student_needs = frozenset({REGION_EMBEDS.name})

    @dataclass
    class Params:
        """This loss's options: the YAML keys beside `weight`."""

        distance: str = "l1"

        def validate(self, where: str) -> None:
            """Raise an error naming `where`.<field> when a value is impossible."""
            if self.distance not in DISTANCES:
                raise ValueError(f"{where}.distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        embeds, targets = student.region_embeds, teacher.region_crop_embeds.detach().to(student.region_embeds.dtype)
        cosine = (embeds * targets).sum(-1)
        if self.params.distance == "l1":
            loss = (embeds - targets).abs().sum(-1).mean()
        else:
            loss = (1 - cosine).mean()
        return loss, {"region_image_cosine": cosine.mean().detach()}


@LOSSES.register("region_text")
class RegionTextDistill(DistillLoss):
    """ViLD-text: each labelled region embedding e_r is classified among the teacher's L2-normalized text
    embeddings of the base class names t_1..t_C and the student's learned background embedding b, with logits
    (e_r . t_1, ..., e_r . t_C, e_r . b) / temperature and cross-entropy against its label (0..C-1 a base class, C
    background); regions labelled -1 are left out. The class embeddings come from the run
    (`LossContext.class_embeddings`, the base classes only: novel names are never trained on)."""

    student_needs = frozenset({REGION_EMBEDS.name, REGION_LABELS.name, REGION_BACKGROUND.name})

    @dataclass
    class Params(TemperatureParams):
        """This loss's options: the YAML keys beside `weight` (ViLD's temperature: 0.01)."""

        temperature: float = 0.01

    def __init__(self, params: "RegionTextDistill.Params", context: LossContext) -> None:
        super().__init__(params, context)
        if context.class_embeddings is None:
            raise ValueError(
                f"{context.config_key}.region_text needs the teacher's base-class text embeddings: it runs under "
                "`vldistill region-distill`, which computes and stores them"
            )
        self.register_buffer("class_embeddings", F.normalize(context.class_embeddings.float(), dim=-1), persistent=False)

    def forward(self, student, teacher):
        """The loss on one batch and its named parts (what is computed: see the class docstring)."""
        embeds, labels = student.region_embeds, student.region_labels
        targets = torch.cat([self.class_embeddings.to(embeds.dtype), student.region_background[None].to(embeds.dtype)])
        logits = embeds @ targets.T / self.temperature
        kept = labels >= 0
        if not bool(kept.any()):
            zero = logits.sum() * 0.0  # keeps the graph: every process backpropagates through the same parameters
            return zero, {"region_text_accuracy": zero.detach()}
        loss = F.cross_entropy(logits[kept], labels[kept])
        accuracy = (logits[kept].argmax(-1) == labels[kept]).float().mean()
        return loss, {"region_text_accuracy": accuracy.detach()}
