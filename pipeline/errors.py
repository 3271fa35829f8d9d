"""The one error type the CLI turns into a clean message (exit code 2) instead of a traceback."""


class ReplayKDError(Exception):
    """A user-facing error: bad input, a mismatched cache, a corrupt shard."""


class ShardMismatch(ReplayKDError):
    """A shard no longer matches its manifest (changed, reordered or truncated)."""


def user_message(exn: ReplayKDError) -> str:
    """The project's own message. One raised in a DataLoader worker comes back wrapped by torch in "Caught X in
    DataLoader worker process N" and the worker's traceback; this unwraps it."""
    text = str(exn)
    marker = f"{type(exn).__module__}.{type(exn).__qualname__}: "
    if text.startswith("Caught ") and "DataLoader worker" in text and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


class Interrupted(ReplayKDError):
    """The run was stopped (Ctrl-C / SIGINT); the message says where, and how to continue (exit code 130)."""
