"""Where data lives: local paths, or object-store URLs (s3://, gs://, https://, hf://, ...) through fsspec.

Locations are `Path`s when local and `str` URLs otherwise; `join`, `read_bytes`, `sizes` and `Storage` take either.
Object stores are reached with the options `configure` set for this process (a command's `--storage-options`) on
top of what the ordinary environment gives (AWS_* variables and profiles, AWS_ENDPOINT_URL, GOOGLE_* ...): nothing
here stores credentials anywhere. fsspec keeps one file-system instance per process (a forked loader worker makes
its own), so locations are resolved afresh in each process rather than handed over open.

A `Storage` holds whole records under a root (claims, locks, small JSON): created only if absent (of several
concurrent creators exactly one succeeds), replaced whole, read, listed and deleted. Locally a record is written to
a temporary file and linked into place; on S3 a create is a PUT with If-None-Match: * (S3, MinIO, R2 and Ceph honour
it), on GCS an upload with ifGenerationMatch=0, a replace a plain PUT, all atomic per object. Other back-ends cannot
create atomically, and are refused for writing caches (reading works everywhere).
"""
from __future__ import annotations

import os
import posixpath
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from replaykd.errors import ReplayKDError

Location = Path | str

_OPTIONS: dict = {}
# Back-ends whose create-only-if-absent is one conditional request: S3's PUT with If-None-Match: * (s3fs; AWS,
# MinIO, R2, Ceph) and Google Cloud Storage's ifGenerationMatch=0 (gcsfs); both raise FileExistsError when it fails.
ATOMIC_CREATE = ("s3", "s3a", "gs", "gcs")
# Defaults for S3: botocore's standard retry mode (exponential backoff with jitter on throttling, 5xx and dropped
# connections) and no cached listings (claims and locks are listed to see other processes' records).
S3_DEFAULTS = {"config_kwargs": {"retries": {"mode": "standard", "max_attempts": 5}}, "use_listings_cache": False}


def configure(options: dict | None) -> None:
    """Set this process's storage options (fsspec keyword arguments, e.g. endpoint_url, key, secret, profile)."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def options(url: str) -> dict:
    """The fsspec options this process uses for `url` (also given to zarr's remote stores): the defaults, with the
    configured options over them (botocore's `config_kwargs` merged key by key, so retries stay unless replaced)."""
    protocol = url.split("://", 1)[0]
    defaults = S3_DEFAULTS if protocol in ("s3", "s3a") else {}
    merged = {**defaults, **_OPTIONS}
    if "config_kwargs" in defaults and "config_kwargs" in _OPTIONS:
        merged["config_kwargs"] = {**defaults["config_kwargs"], **_OPTIONS["config_kwargs"]}
    return merged


def is_url(location: Location) -> bool:
    """Whether `location` is a URL (s3://...) rather than a local path."""
    return isinstance(location, str) and "://" in location


def as_location(value: Location) -> Location:
    """A URL stays a string (Path would fold its '//'); anything else becomes a Path."""
    refuse_pipes(str(value))
    return value if is_url(str(value)) else Path(value)


def refuse_pipes(value: str) -> None:
    """WebDataset's `pipe:COMMAND` locations are not read here: say what is instead."""
    if value.startswith("pipe:"):
        raise ReplayKDError(f"{value!r}: pipe: commands are not supported; give the shards' URL (s3://, gs://, "
                            "https://, read through fsspec) or a local path")


def join(root: Location, *parts: str) -> Location:
    """`root` / parts, for paths and URLs alike."""
    if is_url(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return Path(root).joinpath(*parts)


def basename(location: Location) -> str:
    """The last part of a path or URL."""
    return posixpath.basename(str(location).rstrip("/")) if is_url(location) else Path(location).name


def parent(location: Location) -> Location:
    """The folder holding a path or URL."""
    return posixpath.dirname(str(location).rstrip("/")) if is_url(location) else Path(location).parent


def filesystem(url: str):
    """(fsspec file system, path inside it) for `url`, with this process's options."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url, **options(url))
    except ImportError as exn:
        raise ReplayKDError(f"{url}: reading {protocol}:// needs a package that is not installed ({exn}); "
                            f"pip install 'replaykd[s3]' (s3://) or 'replaykd[gcs]' (gs://)") from exn
    except (TypeError, ValueError) as exn:
        raise ReplayKDError(f"{url}: the storage options do not fit {protocol}:// ({exn}); check --storage-options")


def _is_storage_error(exn: BaseException) -> bool:
    if isinstance(exn, ReplayKDError):
        return False
    if isinstance(exn, OSError):
        return True
    module = type(exn).__module__.split(".")[0]
    return module in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "fsspec", "google", "requests")


def describe(exn: BaseException) -> str:
    """What went wrong, in a user's words, for the error types object stores raise."""
    name = type(exn).__name__
    if isinstance(exn, FileNotFoundError):
        return f"not found ({exn})"
    if isinstance(exn, PermissionError):
        return f"access denied ({exn}): check the credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE, --storage-options)"
    if name == "NoCredentialsError":
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or key/secret in "
                "--storage-options")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionRefusedError"):
        return f"cannot reach the server ({exn}); retried with backoff, then gave up"
    return f"{name}: {exn}"


@contextmanager
def remote(location: Location, what: str):
    """Turn a storage library's error inside the block into one `ReplayKDError` naming `location` and `what` failed
    (for a URL: local file errors keep their own handling, e.g. a full disk's message)."""
    try:
        yield
    except Exception as exn:
        if not is_url(location) or not _is_storage_error(exn):
            raise
        raise ReplayKDError(f"{location}: {what} failed: {describe(exn)}") from exn


def read_bytes(location: Location) -> bytes:
    """A whole file's bytes: a local path, or an object URL (one GET)."""
    if not is_url(location):
        try:
            return Path(location).read_bytes()
        except FileNotFoundError:
            raise ReplayKDError(f"{location}: not found") from None
    fs, path = filesystem(location)
    with remote(location, "reading"):
        return fs.cat_file(path)


def sizes(folder: Location) -> dict[str, int]:
    """File name -> size of the files directly in `folder` (one listing for an object store)."""
    if not is_url(folder):
        return {f.name: f.stat().st_size for f in Path(folder).iterdir() if f.is_file()} if Path(folder).is_dir() \
            else {}
    fs, path = filesystem(folder)
    with remote(folder, "listing"):
        try:
            # -1: a file whose listing gives no size (some HTTP servers)
            return {posixpath.basename(e["name"].rstrip("/")): -1 if e.get("size") is None else int(e["size"])
                    for e in fs.ls(path, detail=True) if e.get("type") == "file"}
        except FileNotFoundError:
            return {}


def expand(pattern: str) -> list[Location]:
    """The files a glob (with `{a..b}` braces) matches, local or in an object store, sorted."""
    import glob as globlib

    from braceexpand import braceexpand

    refuse_pipes(pattern)
    if not is_url(pattern):
        return sorted({Path(p) for b in braceexpand(pattern) for p in globlib.glob(b) if Path(p).is_file()})
    fs, _ = filesystem(pattern)
    protocol = pattern.split("://", 1)[0]
    found = set()
    for b in braceexpand(pattern):
        path = fs._strip_protocol(b)
        with remote(b, "listing"):
            names = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.exists(path) else [])
        found.update(f"{protocol}://{n}" for n in names)
    return sorted(found)


def probe_create(storage: "LocalStorage | ObjectStorage") -> None:
    """Create one probe key twice and remove it: the first create must succeed and the second fail, or the storage
    does not create only if absent, and every guarantee built on it (one writer per claim, a unit written once) is
    void: refused by name."""
    key = f".probe-{uuid.uuid4().hex}"
    try:
        first, second = storage.create(key, b"probe"), storage.create(key, b"probe")
    finally:
        storage.delete(key)
    if not first or second:
        raise ReplayKDError(f"{storage.root}: the storage does not honour create-only-if-absent (a second create of "
                            f"the probe key {key} {'succeeded' if second else 'found it there already'}), so two "
                            "processes could both take one claim; this back-end cannot hold a cache being built. "
                            "For S3-compatible stores, If-None-Match: * on PUT is needed (AWS S3, MinIO, R2 and Ceph "
                            "RGW 18.2+ honour it)")


def for_root(root: Location) -> "LocalStorage | ObjectStorage":
    """The record storage under `root`."""
    return ObjectStorage(str(root)) if is_url(root) else LocalStorage(Path(root))


class LocalStorage:
    """Records under a local folder, keys '/'-separated."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def _place(self, key: str, data: bytes, link: bool) -> bool:
        """Put `data` at `key` in one step: linked (only if absent; False when it was there) or moved over it.
        The bytes are staged at the root (a folder nothing removes while the store is in use; the hidden file lives
        for one call), and the record's folder is made right before the step (a record deleted beside it may remove
        the folder meanwhile: then it is made again)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{uuid.uuid4().hex}.partial"
        tmp.write_bytes(data)
        path = self._path(key)
        try:
            for _ in range(100):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    if link:
                        os.link(tmp, path)
                    else:
                        os.replace(tmp, path)
                    return True
                except FileExistsError:
                    return False
                except FileNotFoundError:  # its folder went between the two steps
                    continue
            raise ReplayKDError(f"{path}: its folder keeps disappearing; is another program deleting it?")
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, key: str) -> bytes | None:
        """The record's bytes, or None when absent."""
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, key: str) -> bool:
        """Whether a record (or any file) is at `key`."""
        return self._path(key).is_file()

    def write(self, key: str, data: bytes) -> None:
        """Create or replace a record whole."""
        self._place(key, data, link=False)

    def create(self, key: str, data: bytes) -> bool:
        """Create a record only if absent; True if this call created it (one of concurrent creators wins)."""
        return self._place(key, data, link=True)

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
        """Names directly under `prefix` ('' for the root)."""
        folder = self._path(prefix)
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []

    def remove_all(self, keep: str) -> None:
        """Remove every file under the root but the record `keep`, and the folders left empty."""
        kept = self._path(keep)
        for f in sorted(self.root.rglob("*"), reverse=True):  # a folder's files before the folder
            if f.is_dir():
                try:
                    f.rmdir()
                except OSError:  # it holds `keep`
                    pass
            elif f != kept:
                f.unlink()

    def discard_root(self) -> None:
        """Remove the root folder if nothing is left in it."""
        try:
            self.root.rmdir()
        except OSError:  # not empty, or gone
            pass

    def require_atomic_create(self) -> None:
        """Refuse a file system that cannot create a file only if it is absent (a hard link, in one step): probed
        once (some FUSE and SMB mounts have no hard links)."""
        try:
            probe_create(self)
        except OSError as exn:
            raise ReplayKDError(f"{self.root}: this file system cannot create a file only if it is absent (a hard "
                                f"link failed: {exn}), so two processes could both write one unit; write caches to "
                                "a local disk, NFS, Lustre, s3:// or gs://") from exn

    def files(self, prefix: str) -> list[str]:
        """Keys of every file under `prefix`, relative to it."""
        top = self._path(prefix)
        out = []
        for folder, _, names in os.walk(top):
            rel = os.path.relpath(folder, top)
            out += [n if rel == "." else f"{rel}/{n}" for n in names if not n.startswith(".")]
        return out

    def total_bytes(self) -> int:
        """Bytes of every file under the root."""
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())


# Seconds between the tries of a conditional create that S3 answered with a conflict (None: the last try).
CONFLICT_WAITS = (0.1, 0.2, 0.4, 0.8, 1.6, None)


def _conflict(exn: BaseException) -> bool:
    """Whether a failed request was S3's answer to conditional writes of one key at once (409
    ConditionalRequestConflict, which s3fs raises as an OSError holding botocore's error)."""
    while exn is not None:
        response = getattr(exn, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "ConditionalRequestConflict":
            return True
        exn = exn.__cause__ or exn.__context__
    return False


class ObjectStorage:
    """Records under an object-store URL (one object each), through fsspec."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")

    def _fs(self, key: str = ""):
        return filesystem(f"{self.root}/{key}" if key else self.root)

    def read(self, key: str) -> bytes | None:
        """The record's bytes, or None when absent."""
        fs, path = self._fs(key)
        # s3fs asks an object's size first (a HEAD) to split large reads; records and units are read whole
        whole = {"max_concurrency": 1} if self.root.split("://", 1)[0] in ("s3", "s3a") else {}
        with remote(f"{self.root}/{key}", "reading"):
            try:
                return fs.cat_file(path, **whole)
            except FileNotFoundError:
                return None

    def exists(self, key: str) -> bool:
        """Whether an object is at `key`."""
        fs, path = self._fs(key)
        with remote(f"{self.root}/{key}", "looking up"):
            return fs.exists(path)

    def write(self, key: str, data: bytes) -> None:
        """Create or replace a record whole (one PUT)."""
        fs, path = self._fs(key)
        with remote(f"{self.root}/{key}", "writing"):
            fs.pipe_file(path, data)

    def require_atomic_create(self) -> None:
        """Refuse a back-end whose create-only-if-absent is not one atomic request (fsspec's default checks, then
        writes), or one that does not honour it (older Ceph RGW and some on-premises stores ignore If-None-Match:
        probed once, a second create of one key must fail)."""
        self._require_conditional_protocol()
        probe_create(self)

    def _require_conditional_protocol(self) -> None:
        protocol = self.root.split("://", 1)[0]
        if protocol not in ATOMIC_CREATE:
            raise ReplayKDError(f"{self.root}: {protocol}:// cannot create an object only if it is absent in one "
                                "request (fsspec checks, then writes), so two processes could both take one data "
                                "shard and lose each other's data; write caches to s3://, gs:// or a local or "
                                "shared file system (they can be read from anywhere)")

    def create(self, key: str, data: bytes) -> bool:
        """Create a record only if absent (one conditional PUT); True if this call created it."""
        self._require_conditional_protocol()
        fs, path = self._fs(key)
        with remote(f"{self.root}/{key}", "creating"):
            for wait in CONFLICT_WAITS:
                try:
                    fs.pipe_file(path, data, mode="create")
                    return True
                except FileExistsError:
                    return False
                except OSError as exn:
                    # another conditional write of this key was under way, and neither may have won: S3 says to
                    # try again, which either creates it or finds it there
                    if not _conflict(exn) or wait is None:
                        raise
                    time.sleep(wait)

    def delete(self, key: str) -> None:
        """Remove a record (absent: nothing to do)."""
        fs, path = self._fs(key)
        with remote(f"{self.root}/{key}", "deleting"):
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

    def children(self, prefix: str) -> list[str]:
        """Names directly under `prefix` ('' for the root)."""
        fs, path = self._fs(prefix)
        with remote(f"{self.root}/{prefix}", "listing"):
            try:
                names = fs.ls(path, detail=False)
            except FileNotFoundError:
                return []
        return sorted(n for n in (posixpath.basename(n.rstrip("/")) for n in names) if not n.startswith("."))

    def remove_all(self, keep: str) -> None:
        """Remove every object under the root but the record `keep`."""
        fs, path = self._fs()
        with remote(self.root, "removing a half-made store"):
            doomed = [p for p in fs.find(path) if posixpath.relpath(p, path) != keep]
            if doomed:
                fs.rm(doomed)

    def discard_root(self) -> None:
        """Nothing to do: an object store has no folders."""

    def files(self, prefix: str) -> list[str]:
        """Keys of every object under `prefix`, relative to it (one listing, paged)."""
        fs, path = self._fs(prefix)
        with remote(f"{self.root}/{prefix}", "listing"):
            try:
                return [posixpath.relpath(p, path) for p in fs.find(path)]
            except FileNotFoundError:
                return []

    def total_bytes(self) -> int:
        """Bytes of every object under the root."""
        fs, path = self._fs()
        with remote(self.root, "listing"):  # sizes from the listing itself (du asks each object: a HEAD apiece)
            return sum(int(e.get("size") or 0) for e in fs.find(path, detail=True).values())
