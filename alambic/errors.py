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
    """A loss term became NaN or infinite; the message names the step and the term, and says what there is
    to resume from: the last good checkpoint (its step and file) or, truthfully, that none was written yet."""

    def __init__(self, step: int, term: str, value: float, checkpoint: str | None = None,
                 checkpoint_step: int | None = None):
        self.step, self.term, self.value = step, term, value
        self.checkpoint, self.checkpoint_step = checkpoint, checkpoint_step
        if checkpoint is not None and checkpoint_step is not None:
            kept = f"the last good checkpoint (step {checkpoint_step}) is kept in {checkpoint}"
        else:
            kept = "no checkpoint was written yet, so there is nothing to resume from"
        super().__init__(
            f"non-finite loss at step {step}: term '{term}' = {value} "
            f"(lower the learning rate, enable train.clip_grad_norm, or check the inputs); {kept}"
        )


class RunDirError(AlambicError):
    """The run directory is in a state that the requested action cannot use."""


class CheckpointError(RunDirError):
    """A checkpoint does not fit the run that resumes from it (metadata missing, of the wrong type or out of
    range; tensors of other names or shapes; another teacher); the message names the file and the problem."""


class IntegrityError(AlambicError):
    """A file alambic wrote no longer matches the digest stored in it when it was written (a flipped bit,
    a torn copy, an edit); the message names the file and the damaged part."""


class WriteError(AlambicError):
    """A file could not be written (a full disk, no permission); the message names it and says what is kept."""


class UntrustedCodeError(RunDirError):
    """A run directory names code (a ``module:`` factory) that loading it would import and call; refused unless
    the caller says it trusts that directory. Exits 2: the fix is a flag the user adds."""

    exit_code = 2


class OutDirError(RunDirError):
    """``--out`` cannot be a run directory: it is a file, lies under one, or cannot be written; the message
    names the path. Exits 2, like a usage error: the fix is another ``--out``."""

    exit_code = 2
