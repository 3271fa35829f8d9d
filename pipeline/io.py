"""Crash-safe file writes: write beside the target, then rename into place."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at start-up: os.umask can only be read by setting it.
UMASK = _umask()


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds. The file gets the
    mode an ordinarily created file would (0666 less the umask), whatever the writer used (safetensors: 0600)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_section(path: Path, section: str, body: str) -> bool:
    """Replace the text between `<!-- {section}:start -->` and `<!-- {section}:end -->` in a file (atomically);
    False if the file or its markers are absent."""
    import re

    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    path = Path(path)
    if not path.exists() or start not in path.read_text():
        return False
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body.rstrip()}\n{end}",
                  path.read_text(), flags=re.S)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True
