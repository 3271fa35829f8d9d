"""Stage two's link to the cache: attach each view's cached teacher targets, proving the replay on the way."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.cache import TeacherCache
from pipeline.errors import ReplayKDError
from pipeline.loader import Unit

CHECK_EVERY = {"all": 1, "sample": 16, "off": 0}


class CachedTargets:
    """Runs in the loader worker on each (shard, epoch): reads the unit once, then checks views and adds targets."""

    def __init__(self, store: Path):
        self.store = Path(store)
        self._cache: TeacherCache | None = None

    def __call__(self, unit: Unit, epoch: int) -> Callable[[dict], None]:
        if self._cache is None:  # opened in the worker process
            self._cache = TeacherCache.open(self.store)
        data = self._cache.read_unit(epoch, unit.shard_no)

        def attach(it: dict) -> None:
            p = it["position"]
            if it["fingerprint"] >= 0 and it["fingerprint"] != data["fingerprint"][p]:
                raise ReplayKDError(
                    f"view of key '{it['key']}' (epoch {epoch}, shard {unit.shard}) does not match the cache: "
                    f"fingerprint {it['fingerprint']:08x} replayed, {int(data['fingerprint'][p]):08x} stored. The shard, "
                    f"the recipe or the augmentation libraries changed since {self.store} was built")
            if it["partner"] != data["partner"][p] or it["seed"] != data["seed"][p]:
                raise ReplayKDError(f"view of key '{it['key']}' (epoch {epoch}, shard {unit.shard}): seed or mix partner "
                                    f"differs from {self.store}")
            it["t_probs"], it["t_classes"] = data["probs"][p], data["classes"][p]  # rows; ViewCollate stacks them

        return attach
