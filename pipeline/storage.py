"""Whole-object storage under a root: a local folder (or, through fsspec, an object store URL).

What stage one needs beyond Zarr's own reads and writes: small records created only if absent (claims: exactly
one of several concurrent creators succeeds), replaced whole, read, listed and deleted. On a local file system a
record is written to a temporary file and linked into place, so it appears whole or not at all, and a link fails
where the name exists (the same rule Zarr's local store follows).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


class LocalStorage:
    """Records under a local folder, keys '/'-separated."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _staged(self, key: str, data: bytes) -> Path:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        tmp.write_bytes(data)
        return tmp

    def read(self, key: str) -> bytes | None:
        """The record's bytes, or None when absent."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, key: str, data: bytes) -> None:
        """Create or replace a record whole."""
        os.replace(self._staged(key, data), self._path(key))

    def create(self, key: str, data: bytes) -> bool:
        """Create a record only if absent; True if this call created it (one of concurrent creators wins)."""
        tmp = self._staged(key, data)
        try:
            os.link(tmp, self._path(key))
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def delete(self, key: str) -> None:
        """Remove a record (absent: nothing to do), and the folders it leaves empty."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root:
                break
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone)
                break

    def children(self, prefix: str) -> list[str]:
        """Names directly under `prefix`."""
        folder = self._path(prefix)
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
