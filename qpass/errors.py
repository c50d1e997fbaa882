"""Errors qpass raises for user mistakes: one line saying what is wrong and what to do."""

__all__ = [
    "QpassError",
    "ModelError",
    "CalibrationError",
    "OutputError",
    "PipelineError",
    "VerificationError",
    "UnknownNameError",
    "first_line",
]


class QpassError(Exception):
    """Base of every user-facing error. The CLI prints its message alone and exits 2."""


class ModelError(QpassError):
    """The input model cannot be read, is invalid, or uses something qpass does not support."""


class CalibrationError(QpassError):
    """Calibration data is missing, unreadable, or does not fit the model."""


class OutputError(QpassError):
    """The output path cannot be written."""


class PipelineError(QpassError):
    """A pass could not run, or the pipeline is misconfigured."""


class VerificationError(PipelineError):
    """A pass produced an invalid graph or changed the float function beyond tolerance."""


class UnknownNameError(QpassError):
    """A pass, recipe or option name that does not exist."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type name when empty), at most 300 characters."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
