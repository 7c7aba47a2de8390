"""Errors a user can act on.

Every error alambic raises on purpose is an :class:`AlambicError`: the CLI prints its message as one
line (no traceback) and exits with its ``exit_code``. Recipe problems exit with 2, like a usage error;
failures during a run exit with 1.
"""

from __future__ import annotations


class AlambicError(Exception):
    """An error whose message is meant for the user, printed as one line by the CLI."""

    exit_code = 1


class RecipeError(AlambicError):
    """A recipe (YAML file or override) is malformed; the message names the key path."""

    exit_code = 2


class ShapeMismatchError(AlambicError):
    """Two tensors that a method compares have incompatible shapes; the message names both."""


class NonFiniteLossError(AlambicError):
    """A loss term became NaN or infinite; the message names the step and the term."""

    def __init__(self, step: int, term: str, value: float):
        self.step, self.term, self.value = step, term, value
        super().__init__(
            f"non-finite loss at step {step}: term '{term}' = {value} "
            "(lower the learning rate, enable train.clip_grad_norm, or check the inputs); "
            "the last good checkpoint is kept"
        )


class RunDirError(AlambicError):
    """The run directory is in a state that the requested action cannot use."""
