"""Problems a user can cause, and how any error is worded for them: one sentence, on one line.

`experiment.py` and `prediction_for_one.py` turn these exceptions into "error: <sentence>" and
exit code 2, never a traceback.
"""

from __future__ import annotations


class SettingsError(Exception):
    """A setting the user gave (flag, constant, settings file, checkpoint to reuse) cannot work."""


class DataError(Exception):
    """A problem with the user's data that should stop the run with one clear sentence."""


def one_line(error: BaseException, limit: int = 200, brief: bool = False) -> str:
    """An error's message on one line, at most `limit` characters; the exception's type name when it
    has no message. With `brief`, the type name and the message's first sentence only (PyTorch's
    messages can run to paragraphs)."""
    text = " ".join(str(error).split())
    if brief:
        text = text.split(". ")[0].rstrip(".") if text else ""
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    text = text or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
