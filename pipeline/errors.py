"""The one error type the CLI turns into a clean message (exit code 2) instead of a traceback."""


class ReplayKDError(Exception):
    """A user-facing error: bad input, a mismatched cache, a corrupt shard."""


class ShardMismatch(ReplayKDError):
    """A shard no longer matches its manifest (changed, reordered or truncated)."""
