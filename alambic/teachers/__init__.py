"""Teachers: anything that maps a batch to outputs without gradients."""

from alambic.teachers.analytic import AnalyticTeacher, estimator_logits
from alambic.teachers.base import ModelOutput, Teacher
from alambic.teachers.frozen import FrozenTeacher, model_outputs, state_fingerprint
from alambic.teachers.transfer import TransferTeacher, param_transfer

__all__ = ["AnalyticTeacher", "FrozenTeacher", "ModelOutput", "Teacher", "TransferTeacher", "estimator_logits",
           "model_outputs", "param_transfer", "state_fingerprint"]
