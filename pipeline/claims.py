"""Claims: names that at most one process holds at a time (a data shard of a store, whose units only its holder
writes; the lock held while a store is created or grown), among the ranks of a launch, the parts of a job array
and independent runs alike, on every storage back-end that can create a record only if it is absent.

One rule for every name: the holder's record is `claims/NAME-gG` (generation G), created only if absent, so of
several processes reaching for a free name exactly one gets it. The holder renews its record (a heartbeat) and, when
done, marks it given up rather than deleting it. A record whose holder is gone or gave it up is stale: on the same
machine (the same boot and process namespace, not merely the same host name: containers share those) its process
has exited; anywhere, it has not been renewed for a lease. The newest record decides, and a stale one is replaced
by generation G + 1, again created only if absent, so of several processes that find it stale exactly one takes over
(the others then see a live holder); generations only grow, so no process can take a name through a record that
was replaced while it looked. Claims on data shards only spread the work, so that processes rarely compute the same
unit: they never keep data safe, since every unit is written once, created only if absent (`pipeline/layouts.py`),
and a holder taken for gone (a machine stalled past its lease) that writes on loses each create to the unit already
there.

A process that has a store open for writing also keeps a presence record (`claims/open-TOKEN`, renewed like the
others): a store is only ever removed when no live process has it open. Records are Zarr groups (the record in the
group's attributes), so the store stays a plain Zarr hierarchy.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from replaykd.errors import ReplayKDError
from replaykd.storage import LocalStorage, ObjectStorage

CLAIMS = "claims"  # the store's group of claim records
CHANGING = "changing"  # the name held while a process creates or grows a store's arrays
OPEN = "open-"  # presence records of the processes that have the store open for writing

# A record whose holder has not renewed it for this long is stale (holders renew it every LEASE_SECONDS / 4).
LEASE_SECONDS = 300.0
# A holder that could not renew a record for this share of the lease stops writing under it: the rest of the lease
# is its margin before another process may take the name.
RENEWAL_MARGIN = 0.5


class ClaimNotRenewed(ReplayKDError):
    """This process could not renew its claim for most of its lease (a storage error each time), so it stops
    writing under it before another process may take it over."""


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _machine() -> str:
    """What makes pids comparable: the host name, this boot and the process namespace ('' where unknown)."""
    boot = _read("/proc/sys/kernel/random/boot_id").strip()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{socket.gethostname()}/{boot}/{namespace}" if boot else ""


def _started(pid: int) -> int:
    """When process `pid` started (clock ticks since boot; -1 when there is no such process or /proc cannot say):
    with the pid, it names one process even after the pid is reused."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return -1


MACHINE = _machine()
STARTED = _started(os.getpid())


@dataclass(frozen=True)
class Claim:
    """A holder's record: the process (`holder` is unique to it), its machine, pid and start, its launch, and when
    it last renewed the record."""

    holder: str
    host: str
    machine: str
    pid: int
    started: int
    launch: str
    renewed: float

    def stale(self, now: float, lease: float = LEASE_SECONDS) -> bool:
        """Whether its holder is gone: its process has exited (known only on the same machine), or it has not
        renewed the record for a lease."""
        if self.machine and self.machine == MACHINE and _exited(self.pid, self.started):
            return True
        return now - self.renewed > lease


def _exited(pid: int, started: int) -> bool:
    """Whether the process `pid` that started at `started` has exited (a pid now used by another process counts)."""
    now = _started(pid)
    if now >= 0:
        return now != started
    try:  # /proc cannot say (hidden pids): only a pid that does not exist is known to be gone
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


TOKEN = uuid.uuid4().hex[:12]  # tells this process's records from those of a process that had its pid before


def this_process(launch: str) -> Claim:
    """A claim record of this process, renewed now."""
    return Claim(f"{socket.gethostname()}:{os.getpid()}:{launch}:{TOKEN}", socket.gethostname(), MACHINE,
                 os.getpid(), STARTED, launch, time.time())


def _group_json(claim: Claim) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": asdict(claim)}).encode()


def _parse(data: bytes) -> Claim | None:
    try:
        return Claim(**json.loads(data)["attributes"])
    except (ValueError, KeyError, TypeError):  # a record of an older layout, or cut short: no live holder
        return None


def _key(name: str, generation: int) -> str:
    return f"{CLAIMS}/{name}-g{generation}/zarr.json"


def newest(storage: LocalStorage | ObjectStorage, name: str) -> tuple[int, Claim | None] | None:
    """The newest record of `name` in a store (generation, claim; claim None when unreadable), or None when the name
    has no record. Generations only grow, and only older ones are ever deleted: one that vanishes while it is read
    was replaced by a newer one, so the listing is read again (a vanished record never reads as a free name)."""
    prefix = f"{name}-g"
    for _ in range(100):  # a record's folder can show before its record does (a local store): wait for it
        generations = [int(n[len(prefix):]) for n in storage.children(CLAIMS)
                       if n.startswith(prefix) and n[len(prefix):].isdigit()]
        if not generations:
            return None
        data = storage.read(_key(name, max(generations)))
        if data is not None:
            return max(generations), _parse(data)
        time.sleep(0.02)
    return max(generations), None  # a creation that died half-way: the next generation replaces it


def _name(what: int | str) -> str:
    """A data shard's claim name (by its number), or a name as given."""
    return f"s{what}" if isinstance(what, int) else what


class Claims:
    """This process's claims on a store's names (data shards by number, or names such as CHANGING)."""

    def __init__(self, storage: LocalStorage | ObjectStorage, launch: str, lease: float = LEASE_SECONDS):
        self.storage, self.lease = storage, lease
        self.launch = launch
        self.holder = this_process(launch).holder
        self.held: dict[str, str] = {}  # name -> key of the record held
        self._renewed: dict[str, float] = {}  # name -> when its record was last written
        self._renew_error: BaseException | None = None  # the last failed renewal's error
        self._taken_over: set[str] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self, what: int | str) -> tuple[int, Claim | None] | None:
        """The newest record of a name (generation, claim; claim None when unreadable), or None."""
        return newest(self.storage, _name(what))

    def take(self, what: int | str) -> bool:
        """Take a name: True if this process now holds it (it was free, or its holder was gone)."""
        name = _name(what)
        found = self.current(name)
        if found is not None and found[1] is not None and not found[1].stale(time.time(), self.lease):
            return found[1].holder == self.holder
        key = _key(name, 0 if found is None else found[0] + 1)
        if not self.storage.create(key, _group_json(this_process(self.launch))):
            # lost to another process, unless the create reached the store and only its answer was lost
            data = self.storage.read(key)
            claim = _parse(data) if data is not None else None
            if claim is None or claim.holder != self.holder:
                return False
        with self.lock:
            self.held[name] = key
            self._renewed[name] = time.time()
            if found is not None and (found[1] is None or found[1].renewed > 0):  # not given up: its holder died
                self._taken_over.add(name)
        if found is not None:  # the record this one replaces
            self.storage.delete(_key(name, found[0]))
        return True

    def took_over(self, what: int | str) -> bool:
        """Whether this process holds a name in place of a holder that was gone without giving it up."""
        with self.lock:
            return _name(what) in self._taken_over

    def key(self, what: int | str) -> str | None:
        """The key of this process's record of a name, while it holds it."""
        with self.lock:
            return self.held.get(_name(what))

    def holds(self, what: int | str) -> bool:
        """Whether this process's record of a name is still the newest one and its own. Raises `ClaimNotRenewed`
        where storage errors kept its records from being renewed for most of their lease."""
        name = _name(what)
        key = self.key(name)
        if key is None:
            return False
        found = self.current(name)
        if found is None or _key(name, found[0]) != key or found[1] is None or found[1].holder != self.holder:
            return False
        self.check_renewed()
        return True

    def check_renewed(self) -> None:
        """Raise `ClaimNotRenewed` where storage errors kept a held record from being renewed for most of its lease
        (asks no storage: called before every unit written)."""
        with self.lock:
            error = self._renew_error
            stale = [(name, time.time() - t) for name, t in self._renewed.items()]
        if error is None:
            return
        for name, since in stale:
            if since > self.lease * RENEWAL_MARGIN:
                raise ClaimNotRenewed(
                    f"could not renew this process's claim on {name} of {self.storage.root} for {since:.0f} s of its "
                    f"{self.lease:.0f} s lease (last error: {type(error).__name__}: {error}); it stops writing before "
                    "the lease ends, so that no other process takes the name while it writes. Every finished unit is "
                    "kept: run the same command again to continue")

    def release(self, what: int | str) -> None:
        """Give a name up (its units are written, or this process stops): its record stays, marked given up, so
        the next holder's generation is a newer one."""
        with self.lock:
            key = self.held.pop(_name(what), None)
            self._renewed.pop(_name(what), None)
            self._taken_over.discard(_name(what))
            if key is None:
                return
            try:
                self.storage.write(key, _group_json(dataclasses.replace(this_process(self.launch), renewed=0.0)))
            except (OSError, ReplayKDError):  # a full disk: deleting it frees the name too
                try:
                    self.storage.delete(key)
                except (OSError, ReplayKDError):  # a store out of reach: the record goes stale by its lease
                    pass

    def open(self) -> None:
        """Record that this process has the store open for writing (held until `release_all`)."""
        self.take(f"{OPEN}{TOKEN}")

    def release_all(self) -> None:
        """Give every held name up and stop renewing."""
        self._stop_renewing()
        for name in list(self.held):
            self.release(name)

    def abandon(self) -> None:
        """Stop renewing and forget every held record without writing it (the store that holds them is being
        removed)."""
        self._stop_renewing()
        with self.lock:
            self.held.clear()
            self._taken_over.clear()

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def others_active(self) -> list[Claim]:
        """Live records of other processes (runs that have this store open or hold a part of it)."""
        now, out = time.time(), []
        for name in self.storage.children(CLAIMS):
            data = self.storage.read(f"{CLAIMS}/{name}/zarr.json") if name != "zarr.json" else None
            claim = _parse(data) if data is not None else None
            if claim is not None and claim.holder != self.holder and not claim.stale(now, self.lease):
                out.append(claim)
        return out

    def renew_in_background(self) -> None:
        """Renew held records every quarter lease, on a thread, until `release_all`."""
        def loop():
            # a failed write (an S3 5xx after botocore's retries, an NFS EIO) is tried again at the next round: one
            # error must not end the renewal, or every record held would go stale while the process runs on
            while not self._stop.wait(self.lease / 4):
                with self.lock:  # a record released meanwhile is not written back
                    error = None
                    for name, key in self.held.items():
                        try:
                            self.storage.write(key, _group_json(this_process(self.launch)))
                        except Exception as exn:  # noqa: BLE001 - any storage error; `holds` reports it
                            error = exn
                        else:
                            self._renewed[name] = time.time()
                    self._renew_error = error
        self._thread = threading.Thread(target=loop, name="claim-renewal", daemon=True)
        self._thread.start()
