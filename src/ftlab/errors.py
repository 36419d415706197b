"""The one exception type users see for bad input.

Library code raises :class:`FtlabError` with a one-line, actionable message that names the
file, line and field at fault; the CLI prints it without a traceback and exits non-zero.
"""


class FtlabError(ValueError):
    """Bad input or configuration, with a message that says what to fix."""
