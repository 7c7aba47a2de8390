"""Training: the loop, schedules, checkpoints."""

from alambic.train.loop import Callback, FitResult, Trainer, make_optimizer
from alambic.train.schedules import lr_schedule
from alambic.train.seeding import seed_everything

__all__ = ["Callback", "FitResult", "Trainer", "lr_schedule", "make_optimizer", "seed_everything"]
