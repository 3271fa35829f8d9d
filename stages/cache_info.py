"""`replaykd cache info`: what a store is, how complete, how large. Its own module, importing neither torch nor
timm, so that it answers in a few seconds."""
from __future__ import annotations

import json

import typer

from pipeline.cache import TeacherCache
from pipeline.cache_report import summarize
from stages.options import CacheInfoOptions


def info(o: CacheInfoOptions) -> None:
    """Print a store's identity, completeness and size."""
    cache = TeacherCache.open(o.store)
    s = summarize(cache)
    if o.json_out:
        extra = {k: cache.attrs.get(k) for k in ("created", "versions", "codecs", "options")}
        typer.echo(json.dumps({**s.as_dict(), "teacher_identity": cache.config.teacher, **extra}, indent=2))
    else:
        typer.echo(s.text())
