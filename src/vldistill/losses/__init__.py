"""Distillation losses: small registered modules (see `LOSSES`) combined into one objective."""

from vldistill.losses.base import LOSSES, DistillLoss, LossContext
from vldistill.losses.registry import DistillationObjective, LossSpec, build_objective, parse_loss_specs

__all__ = ["LOSSES", "DistillLoss", "DistillationObjective", "LossContext", "LossSpec", "build_objective", "parse_loss_specs"]
