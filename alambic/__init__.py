"""alambic: knowledge distillation for PyTorch.

Python API in brief::

    import alambic
    recipe = alambic.load_recipe("recipes/kd_digits.yaml", ["method.temperature=2"])
    summary = alambic.run(recipe, "runs/kd")
    loss = alambic.losses.kd_loss(student_logits, teacher_logits, temperature=4.0)
"""

from alambic import losses
from alambic.data import sources as _sources  # noqa: F401  (registers datasets)
from alambic.models import zoo as _zoo  # noqa: F401  (registers models)
from alambic import methods as _methods  # noqa: F401  (registers methods)
from alambic.data.batch import Batch
from alambic.recipe import Recipe, load_recipe
from alambic.run import load_student, run
from alambic.teachers import AnalyticTeacher, FrozenTeacher, ModelOutput

__version__ = "0.1.0"

__all__ = [
    "AnalyticTeacher", "Batch", "FrozenTeacher", "ModelOutput", "Recipe", "load_recipe", "load_student",
    "losses", "run", "__version__",
]
