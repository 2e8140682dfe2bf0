"""The one exception type users see: a message that says what, where and what to do."""


class SurgeryError(Exception):
    """Bad input or an impossible request; the CLI prints the message as one line and exits non-zero."""


def listed(names, shown: int = 5) -> str:
    """Names for a message: the first `shown`, then how many more."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
