"""The one error type the CLI turns into a clean message (exit code 2) instead of a traceback."""


class ReplayKDError(Exception):
    """A user-facing error: bad input, a mismatched cache, a corrupt shard."""

    def __init__(self, *args):
        # torch re-raises a DataLoader worker's exception as the same class, built from one string: "Caught X in
        # DataLoader worker process N", then the worker's traceback, ending in "module.X: <the message>". Keeping
        # only that message here means every message that quotes this error (str(exn), f"{exn} ...") stays the
        # project's one line; the worker's traceback becomes a note, shown with the traceback (REPLAYKD_DEBUG=1).
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if text.startswith("Caught ") and "DataLoader worker" in text and marker in text:
            worker, message = text.rsplit(marker, 1)
            super().__init__(message.strip())
            self.__notes__ = [worker.rstrip()]  # what add_note (Python 3.11+) sets; 3.10 keeps it unprinted
        else:
            super().__init__(*args)


class BadImage(ReplayKDError):
    """An image that does not decode (named by its shard and key)."""

    @classmethod
    def of(cls, origin: str, exn: Exception) -> "BadImage":
        """The error for bytes Pillow cannot decode, naming `origin` (Pillow's own message for an unknown format
        names only the in-memory buffer it was given, '<_io.BytesIO object at 0x...>')."""
        from PIL import UnidentifiedImageError  # here: the command line imports this module, and --help stays light

        why = ("not an image format Pillow reads, or its header is corrupt" if isinstance(exn, UnidentifiedImageError)
               else str(exn) or type(exn).__name__)
        return cls(f"cannot decode image {origin}: {why}")


class ShardMismatch(ReplayKDError):
    """A shard no longer matches its manifest (changed, reordered or truncated)."""


class Interrupted(ReplayKDError):
    """The run was stopped (Ctrl-C / SIGINT); the message says where, and how to continue (exit code 130)."""
