"""One clear message and exit status 2 for the errors a user can cause, in every script.

The scripts' ``cli`` functions call :func:`exit_code` around their work. Bad flags, files and data raise
``ValueError`` (``DatasetError``, ``DataConfigError`` ...), ``CheckpointError``, ``RunLockError`` or an ``OSError``
from the file system; each becomes one logged line instead of a traceback. ``OSError``s that name a path get a
sentence saying what is wrong with it and what to do.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from utils.checkpoint import CheckpointError
from utils.run_lock import RunLockError

USER_ERRORS = (ValueError, OSError, CheckpointError, RunLockError)


def describe_error(err: BaseException) -> str:
    """The message for ``err``: our own errors' text, or a sentence about the path of a file-system error."""
    if not isinstance(err, OSError) or err.filename is None:
        return str(err)
    path = err.filename
    if isinstance(err, PermissionError):
        return (
            f"{path}: permission denied; write to a folder you may write (--output, --save-dir or --experiment), or "
            "fix the permissions"
        )
    if err.errno == errno.ELOOP:
        return f"{path} is a loop of symbolic links; fix or remove the link"
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        return f"{path}: a file stands where a folder is needed; choose another --output/--experiment or move the file"
    if isinstance(err, IsADirectoryError):
        return f"{path} is a folder; a file was expected there"
    if isinstance(err, FileNotFoundError):
        return f"{path} does not exist"
    if err.errno == errno.ENOSPC:
        return f"{path}: no space left on the device; free some space or write elsewhere"
    return f"{path}: {err.strerror}"


def exit_code(run: Callable[[], int], logger: logging.Logger) -> int:
    """``run()``'s exit code; a user error is logged as one line and gives 2."""
    try:
        return run()
    except USER_ERRORS as err:
        logger.error("%s", describe_error(err))
        return 2
