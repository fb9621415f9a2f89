"""User-facing errors.

Every mistake a user can make (a missing file, a model that is not ONNX, data
of the wrong shape) is raised as a :class:`UserError` whose message is one line
naming the problem and the fix. The CLI prints that line and exits with
:data:`EXIT_USER_ERROR`; anything else is a bug in trtq and exits with
:data:`EXIT_INTERNAL_ERROR`. Keeping the two apart is what lets scripts rely on
the exit code.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
#: A quality gate (``--min-cosine``, ``--max-drop``) was broken.
EXIT_GATE_FAILED = 3


class UserError(Exception):
    """A problem with the user's input, reported as one actionable line.

    ``problem`` says what is wrong, ``fix`` what to do about it; both end up on
    the same line so that logs and CI output stay greppable.
    """

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ") if fix else None
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.problem}. {self.fix}." if self.fix else f"{self.problem}."


class ModelError(UserError):
    """The model file cannot be read, is not ONNX, or is not valid."""


class DataError(UserError):
    """Calibration or evaluation data is missing, malformed or does not fit the model."""


class MissingDependencyError(UserError):
    """An optional dependency (Pillow, pycuda, tensorrt) is needed but not installed."""


class GateFailedError(Exception):
    """A quality gate the caller asked for (``min_cosine``, ``max_rel_l2``, ``max_drop``) broke.

    Not a :class:`UserError`: the input was fine, the result is not good enough. The
    message is one line naming the output, the figure and the threshold; ``result`` is
    what was measured (and, for ``trtq.quantize``, the model), so that a caller can
    still report or inspect it. The CLI exits with :data:`EXIT_GATE_FAILED`.
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or raise a one-line error naming the pip extra.

    Optional dependencies are imported lazily through this helper so that
    ``import trtq`` works on a machine without them.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}', which is not installed",
            f"install it with: pip install 'trtq[{extra}]'",
        ) from exc
