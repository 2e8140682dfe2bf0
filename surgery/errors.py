"""The one exception type users see: a message that says what, where and what to do."""


class SurgeryError(Exception):
    """Bad input or an impossible request; the CLI prints the message as one line and exits non-zero."""
