"""The teachers of a run: a teacher loaded from a model folder or hub id, the configured ensemble's members
and combine weights, and the ensemble with the preprocessors of the teachers that take other inputs than
the student. Used by training (train.runs) and by the cache builder (cache.build) alike."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from vldistill.config import ExperimentConfig
from vldistill.data.preprocess import BatchPreprocessor
from vldistill.teachers.ensemble import TeacherEnsemble
from vldistill.models.inputs import InputSpec
from vldistill.models.loading import load_dual_encoder_any
from vldistill.trained import TrainedModel


def load_teacher(path: str, trust_remote_code: bool = False) -> TrainedModel:
    """A teacher from a model folder or hub id (any registered family: CLIP, SigLIP, BLIP, a vldistill
    two-tower folder ...)."""
    model, tokenizer = load_dual_encoder_any(path, trust_remote_code=trust_remote_code)
    return TrainedModel(model, tokenizer, Path(path))


def ensemble_members(cfg: ExperimentConfig, primary: TrainedModel) -> list[TrainedModel]:
    """The primary teacher followed by each loaded `teacher.ensemble` entry."""
    return [primary, *(load_teacher(entry.path, entry.trust_remote_code) for entry in cfg.teacher.ensemble)]


def teacher_weights(cfg: ExperimentConfig) -> list[float]:
    """The combine weight of each teacher: the primary's, then the ensemble's."""
    return [cfg.teacher.weight, *(entry.weight for entry in cfg.teacher.ensemble)]


def teacher_ensemble(
    cfg: ExperimentConfig,
    primary: TrainedModel,
    student_inputs: InputSpec,
    members: Optional[list[TrainedModel]] = None,
) -> tuple[TeacherEnsemble, dict[str, BatchPreprocessor]]:
    """The primary teacher plus `teacher.ensemble` (or the given `members`, primary first), and the
    preprocessors of the teachers that take other inputs than the student (batch keys prefixed
    `teacher{k}.`): every further teacher, and the primary when its input spec differs (e.g. SigLIP's
    max-length padding). The teachers run in `teacher.precision`."""
    members = ensemble_members(cfg, primary) if members is None else members
    keys, extra = [""], {}
    if primary.model.input_spec != student_inputs:
        keys[0] = "teacher0"
        extra["teacher0"] = BatchPreprocessor.for_model(primary.tokenizer, primary.model.input_spec)
    for k, member in enumerate(members[1:], start=1):
        keys.append(f"teacher{k}")
        extra[f"teacher{k}"] = BatchPreprocessor.for_model(member.tokenizer, member.model.input_spec)
    teachers = [member.model for member in members]
    ensemble = TeacherEnsemble(teachers, keys, cfg.teacher.combine, teacher_weights(cfg), cfg.teacher.precision)
    return ensemble, extra


def check_teacher_fits_data(teacher, data_image_size: int) -> None:
    """Raise ValueError when the data's images are not the size the primary teacher's image tower takes."""
    expected = teacher.input_spec.image_size
    if expected != data_image_size:
        raise ValueError(f"data.image_size is {data_image_size} but the teacher takes {expected}x{expected} images")
