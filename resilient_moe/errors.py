"""Error types that reach users. Each message names the problem: the field, tensor, file or value at fault."""


class ResilientMoeError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(ResilientMoeError, ValueError):
    """A configuration file, flag or config.json field is missing or invalid."""


class CheckpointError(ResilientMoeError):
    """A checkpoint directory is unreadable, incomplete, or does not match its config."""


class RequestError(ResilientMoeError, ValueError):
    """A generation request is invalid (prompt too long, bad sampling parameter, unknown token id...)."""


class ExpertUnavailableError(ResilientMoeError):
    """No live replica of an expert is left, so requests routed to it cannot proceed.

    `tokens` are the rows of the micro-batch whose tokens needed the missing expert (None: all).
    """

    def __init__(self, message: str, tokens: set[int] | None = None) -> None:
        super().__init__(message)
        self.tokens = tokens


class ClusterError(ResilientMoeError):
    """The cluster could not start (a worker died or did not become ready); the message has its log."""
