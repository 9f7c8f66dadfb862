"""Errors a user can fix. The CLI prints them as one line and exits non-zero, no traceback."""


class PipelineError(Exception):
    """A user-facing problem: bad config, bad input data, a missing file."""


class ConfigError(PipelineError):
    """A config key is unknown, missing or has a bad value; the message names the key."""
