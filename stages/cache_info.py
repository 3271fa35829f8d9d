"""`replaykd cache info`: what a store is, how complete, how large; for several stores, also whether they hold the
same views and how often their teachers' top-1 agree. Its own module, importing neither torch nor timm, so that it
answers in a few seconds."""
from __future__ import annotations

import itertools
import json

import typer

from replaykd.cache import TeacherCache
from replaykd.cache_report import compare, summarize
from replaykd.stages.options import CacheInfoOptions


def info(o: CacheInfoOptions) -> None:
    """Print each store's identity, completeness and size, then each pair's shared views and top-1 agreement."""
    caches = [TeacherCache.open(store) for store in o.stores]
    summaries = [summarize(cache) for cache in caches]
    pairs = [compare(a, b, o.units) for a, b in itertools.combinations(caches, 2)]
    if o.json_out:
        stores = [{**s.as_dict(), "teacher_identity": cache.config.teacher,
                   **{k: cache.attrs.get(k) for k in ("created", "versions", "codecs", "options")}}
                  for cache, s in zip(caches, summaries)]
        shown = stores[0] if len(stores) == 1 else {"stores": stores, "comparisons": [p.as_dict() for p in pairs]}
        typer.echo(json.dumps(shown, indent=2))
    else:
        typer.echo("\n".join([s.text() for s in summaries] + [p.text() for p in pairs]))
