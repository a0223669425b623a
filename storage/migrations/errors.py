"""Migration errors that carry what a caller needs to react: all are :class:`storage.MigrationError`.

The command line turns :class:`MigrationValidationError` and :class:`DirtyMigrationError` into exit code 2 (a state
a human must look at) and every other error into 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MigrationError
from .results import InProgress, MigrationProblem, MigrationRun

__all__ = ["MigrationError", "MigrationValidationError", "DirtyMigrationError", "MigrationFailedError"]


class MigrationValidationError(MigrationError):
    """The ledger and the code disagree (``problems``); nothing was run. Fix the code, ``repair``, or ``force``."""

    def __init__(self, message: str, problems: Sequence[MigrationProblem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


class DirtyMigrationError(MigrationError):
    """A previous step was interrupted (``in_progress``); nothing was run. See :meth:`InProgress.explain`."""

    def __init__(self, in_progress: InProgress) -> None:
        super().__init__(in_progress.explain())
        self.in_progress = in_progress


class MigrationFailedError(MigrationError):
    """A migration raised. Nothing of that step was kept; ``completed`` lists the steps of this run before it,
    which each committed on their own and stay applied. The original exception is ``__cause__``."""

    def __init__(self, message: str, *, version: str, completed: MigrationRun) -> None:
        super().__init__(message)
        self.version = version
        self.completed = completed
