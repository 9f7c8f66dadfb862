"""Errors a user can fix. The CLI prints them as one line and exits non-zero, no traceback."""


class PipelineError(Exception):
    """A user-facing problem: bad config, bad input data, a missing file. `detail` (a table, say)
    is printed as is after the one line."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ConfigError(PipelineError):
    """A config key is unknown, missing or has a bad value; the message names the key."""


class StageInputError(PipelineError):
    """A stage command stopped on a problem the user can fix (its one line): retrying would not
    help, and `run` exits 2 with that line."""


# A stage command writes its one-line error here (the file this variable names) when it stops on
# a PipelineError, so that the flow running it through `dvc repro` can say that line, not DVC's.
ERROR_FILE_ENV = "QLORA_PIPELINE_ERROR_FILE"
# Failing writes a user can fix (a full disk, a quota, a file size limit, a read-only folder).
WRITE_ERRNOS = ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM")
