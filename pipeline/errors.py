"""Errors users see.

Every error raised on bad input is a ``KDError`` whose message says what was expected, what was
found and what to do next; the CLI prints it without a traceback and exits with status 2.
"""


class KDError(Exception):
    """A user-facing error: bad input, a refused operation, a corrupt artefact."""


class DatasetError(KDError):
    """A dataset spec or file is wrong."""


class ModelSpecError(KDError):
    """A model spec cannot be parsed or built."""


class CheckpointError(KDError):
    """A checkpoint cannot be loaded or does not describe itself."""


class CacheError(KDError):
    """A logit cache is missing, partial, corrupt or does not match what it is used with."""


class ConfigError(KDError):
    """One or more configuration values are invalid (all problems are listed at once)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))
