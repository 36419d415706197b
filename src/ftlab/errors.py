"""The one exception type users see for bad input.

Library code raises :class:`FtlabError` with a one-line, actionable message that names the
file, line and field at fault; the CLI prints it without a traceback and exits non-zero.
"""


class FtlabError(ValueError):
    """Bad input or configuration, with a message that says what to fix."""


def damaged(path: object, error: BaseException, remedy: str = "restore it or start afresh with --overwrite",
            ) -> FtlabError:
    """The one-line error for a file ftlab wrote that can no longer be read: names the file,
    the reason (first line of ``error``) and what to do."""
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    return FtlabError(f"{path} is damaged ({type(error).__name__}{': ' + reason if reason else ''}); {remedy}")
