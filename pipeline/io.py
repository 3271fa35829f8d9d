"""Files: crash-safe writes (write beside the target, then rename into place), whether an output can be written at
all, and the YAML and JSON-lines reads that options, recipes and run logs share."""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from replaykd.errors import ReplayKDError
from replaykd.storage import is_url


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


def check_writable(out, flag: str) -> None:
    """Refuse, naming `flag` and the path, a local output this process cannot write (a read-only mount, no
    permission, a file where a folder must be), before a command writes anything; a URL is left to its store."""
    if is_url(out):
        return
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ReplayKDError(f"{flag} {out} cannot be written: {existing} is a file, not a folder")
    # Only a real write tells: root passes every permission check, yet a read-only mount (EROFS) or a kernel file
    # system (EPERM) still refuses; the probe folder goes at once.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".replaykd-write-check-", dir=existing))
    except OSError as exn:
        raise ReplayKDError(f"{flag} {out} cannot be written: {exn.strerror or exn} in {existing}") from None


def write_json_atomic(path: Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def replace_section(path: Path, section: str, body: str) -> bool:
    """Replace the text between `<!-- {section}:start -->` and `<!-- {section}:end -->` in a file (atomically);
    False if the file or its markers are absent."""
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    if start not in text or end not in text:
        return False
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{body.rstrip()}\n{end}", text,
                  flags=re.S)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def publish_markdown(folder: Path, name: str, markdown: str, readme: Path | None) -> None:
    """Write FOLDER/NAME.md (atomically) from NAME.json's figures and, with `readme`, its NAME section."""
    with atomic_path(Path(folder) / f"{name}.md") as tmp:
        tmp.write_text(markdown)
    if readme is not None:
        replace_section(readme, name, f"From `{folder}/{name}.json`:\n\n{markdown}")


def read_yaml_mapping(path: Path, what: str, holds: str) -> dict:
    """The mapping in a YAML file; an error names the file as `what` and says the mapping `holds` what."""
    import yaml  # here, not at the top: the CLI imports this module and --help stays light

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exn:
        raise ReplayKDError(f"{what} {path} is not valid YAML: {exn}") from exn
    if not isinstance(data, dict):
        raise ReplayKDError(f"{what} {path} must be a mapping of {holds}")
    return data


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
