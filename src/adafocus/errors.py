"""The project's one exception type."""


class AdaFocusError(Exception):
    """A problem the user can fix: what is wrong, with what, and what to do about it."""

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what}\n  fix: {fix}")


def require(condition: bool, what: str, fix: str | None = None) -> None:
    if not condition:
        raise AdaFocusError(what, fix)
