"""The project's exception types: one for problems the user can fix, one for broken invariants."""


class AdaFocusError(Exception):
    """A problem the user can fix: what is wrong, with what, and what to do about it."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what}\n  fix: {fix}")


class NonFiniteOutput(AdaFocusError):
    """The model computed NaN or inf for an input whose pixels were finite: a fault of the engine (an
    fp16 or INT8 overflow, a broken export), not of the input, so a server answers it as its own
    fault (500), where other AdaFocusErrors ask the client to change the request (400)."""


class InternalError(RuntimeError):
    """An invariant of adafocus-deploy itself does not hold: a bug to report, not a user error.
    Raised `from` the exception that revealed it, so the cause is kept."""


def error_text(error: BaseException) -> str:
    """One line saying why something failed (a video, an input), for reports and JSONL lines."""
    if isinstance(error, AdaFocusError):
        return error.what if error.fix is None else f"{error.what} (fix: {error.fix})"
    return f"{type(error).__name__}: {error}"


def first_of(items, shown: int = 5) -> str:
    """The first `shown` items, comma-separated, and how many more: for errors naming offenders."""
    items = [str(i) for i in items]
    text = ", ".join(items[:shown])
    return text + (f" and {len(items) - shown} more" if len(items) > shown else "")
