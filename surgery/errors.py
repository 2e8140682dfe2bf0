"""The one exception type users see: a message that says what, where and what to do."""
import re


class SurgeryError(Exception):
    """Bad input or an impossible request; the CLI prints the message as one line and exits non-zero."""


def listed(names, shown: int = 5) -> str:
    """Names for a message: the first `shown`, then how many more."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def regex(text: str, where: str) -> re.Pattern:
    """A user's regular expression compiled, or one line naming where it came from (a flag, an entry)."""
    try:
        return re.compile(text)
    except (re.error, RecursionError, OverflowError) as e:
        raise SurgeryError(f"{where}: bad regex {text!r}: {e}") from None
