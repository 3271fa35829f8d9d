"""Claims: at most one writer per data shard of a store, among the ranks of a launch, the parts of a job array and
independent runs alike.

A process writes a data shard's units (its Zarr shard files and its completion records) only while it holds that
shard's claim: a small record created only if absent, so that of several processes reaching for one shard exactly
one gets it. The holder renews it (a heartbeat); one whose process is gone (on this host: its pid is dead;
elsewhere: no heartbeat for a lease) is stale, and a newer claim replaces it: generation g + 1, again created only if
absent, so one replacer wins. A holder checks its claim is still the current one before each unit it writes, so a
holder that was wrongly taken for dead stops instead of writing beside the new one. Claims are Zarr groups (their
record in the group's attributes) under `claims/`, so the store stays a plain Zarr hierarchy.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from pipeline.storage import LocalStorage, ObjectStorage

CLAIMS = "claims"  # the store's group of claim records

# A claim whose holder has not renewed it for this long is stale (holders renew it every LEASE_SECONDS / 4).
LEASE_SECONDS = 300.0


@dataclass(frozen=True)
class Claim:
    """Who holds a data shard: the process (host, pid), its launch, and when it last renewed the claim."""

    holder: str
    host: str
    pid: int
    launch: str
    renewed: float

    def stale(self, now: float, lease: float = LEASE_SECONDS) -> bool:
        """Whether its holder is gone: a dead pid on this host, or no renewal for a lease."""
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return now - self.renewed > lease


def _group_json(claim: Claim) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": asdict(claim)}).encode()


def this_process(launch: str) -> Claim:
    """A claim record of this process, renewed now."""
    return Claim(f"{socket.gethostname()}:{os.getpid()}:{launch}", socket.gethostname(), os.getpid(), launch,
                 time.time())


def read_claim(storage: LocalStorage | ObjectStorage, key: str) -> Claim | None:
    """The claim record at `key` (a claim's group metadata, or a bare record), or None."""
    data = storage.read(key)
    if data is None:
        return None
    record = json.loads(data)
    return Claim(**record.get("attributes", record))


class Claims:
    """This process's claims on a store's data shards."""

    def __init__(self, storage: LocalStorage | ObjectStorage, launch: str, lease: float = LEASE_SECONDS):
        self.storage, self.lease = storage, lease
        self.holder = this_process(launch).holder
        self.launch = launch
        self.held: dict[int, str] = {}  # shard_no -> key of the claim record held
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _claim(self) -> Claim:
        return this_process(self.launch)

    def current(self, shard_no: int) -> tuple[int, Claim] | None:
        """The newest claim record of a data shard (generation, claim), or None."""
        names = [n for n in self.storage.children(CLAIMS) if n.startswith(f"s{shard_no}-g")]
        for name in sorted(names, key=lambda n: int(n.rsplit("g", 1)[1]), reverse=True):
            data = self.storage.read(f"{CLAIMS}/{name}/zarr.json")
            if data is not None:
                return int(name.rsplit("g", 1)[1]), Claim(**json.loads(data)["attributes"])
        return None

    def take(self, shard_no: int) -> bool:
        """Claim a data shard: True if this process now holds it (it was free, or its claim was stale)."""
        found = self.current(shard_no)
        if found is not None and not found[1].stale(time.time(), self.lease):
            return found[1].holder == self.holder
        generation = 0 if found is None else found[0] + 1
        key = f"{CLAIMS}/s{shard_no}-g{generation}/zarr.json"
        if not self.storage.create(key, _group_json(self._claim())):
            return False
        if found is not None:  # the stale record this one replaces
            self.storage.delete(f"{CLAIMS}/s{shard_no}-g{found[0]}/zarr.json")
        with self.lock:
            self.held[shard_no] = key
        return True

    def holds(self, shard_no: int) -> bool:
        """Whether this process's claim on the shard is still the current one (checked before each write): its
        record is there, still its own, and no newer generation replaced it."""
        with self.lock:
            key = self.held.get(shard_no)
        if key is None:
            return False
        data = self.storage.read(key)
        name = key.split("/")[1]
        newer = f"{CLAIMS}/{name.rsplit('g', 1)[0]}g{int(name.rsplit('g', 1)[1]) + 1}/zarr.json"
        return data is not None and json.loads(data)["attributes"]["holder"] == self.holder and \
            self.storage.read(newer) is None

    def release(self, shard_no: int) -> None:
        """Give a data shard up (its units are written, or this process stops)."""
        with self.lock:
            key = self.held.pop(shard_no, None)
            if key is not None:
                self.storage.delete(key)

    def release_all(self) -> None:
        """Give every held shard up and stop renewing."""
        self._stop.set()
        for shard_no in list(self.held):
            self.release(shard_no)

    def others_active(self) -> list[Claim]:
        """Live claims of other processes (runs building this store now)."""
        now, out = time.time(), []
        for name in self.storage.children(CLAIMS):
            data = self.storage.read(f"{CLAIMS}/{name}/zarr.json") if name != "zarr.json" else None
            if data is not None:
                claim = Claim(**json.loads(data)["attributes"])
                if claim.holder != self.holder and not claim.stale(now, self.lease):
                    out.append(claim)
        return out

    def renew_in_background(self) -> None:
        """Renew held claims every quarter lease, on a thread, until `release_all`."""
        def loop():
            while not self._stop.wait(self.lease / 4):
                with self.lock:  # a claim released meanwhile is not written back
                    for key in self.held.values():
                        self.storage.write(key, _group_json(self._claim()))
        self._thread = threading.Thread(target=loop, name="claim-renewal", daemon=True)
        self._thread.start()
