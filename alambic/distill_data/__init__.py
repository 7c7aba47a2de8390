"""Distillation through data: a small training set that carries what the teacher (or the full data) knows.

One file per method, each registered in :data:`DATA_DISTILLERS` (``distill.method``):

- ``random`` (:mod:`.random_subset`): class-balanced random real images, the baseline at the same size;
- ``herding`` / ``kcenter`` (:mod:`.herding`): real images picked per class in the teacher's feature space;
- ``dm`` (:mod:`.dm`): Distribution Matching, synthetic images (Zhao & Bilen, WACV 2023);
- ``krr_st`` (:mod:`.krr_st`): learnable images and targets by kernel ridge regression to a frozen
  self-supervised teacher, with a model pool (:mod:`.pool`) (Lee et al., ICLR 2024).

``alambic distill-data RECIPE --out DIR`` (:func:`distill_data`) writes the set
(:mod:`.synthetic_set`); a run's recipe trains a student on it with ``data: {distilled: DIR}`` (and, for
KRR-ST's targets, ``teacher: {distilled: DIR}`` with ``method: regress``). The losses are pure functions in
:mod:`alambic.losses.dataset_distill`.
"""

from alambic.distill_data import dm, herding, krr_st, random_subset  # noqa: F401  (register the methods)
from alambic.distill_data.build import distill_data
from alambic.distill_data.recipe import (
           DATA_DISTILLERS,
           DistillRecipe,
           load_distill_recipe,
)
from alambic.distill_data.synthetic_set import (
           SetTargetsTeacher,
           SyntheticSet,
           load_set,
           save_set,
           train_on_set,
)

__all__ = ["DATA_DISTILLERS", "DistillRecipe", "SetTargetsTeacher", "SyntheticSet", "distill_data",
           "load_distill_recipe", "load_set", "save_set", "train_on_set"]
