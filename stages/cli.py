"""The `replaykd` command. Each command's options are derived from its dataclass in `stages/options.py`; the
stage module that does the work is imported only when the command runs, so `--help` is instant."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from replaykd import storage
from replaykd.errors import Interrupted, ReplayKDError
from replaykd.io import read_yaml_mapping
from replaykd.malloc import reuse_freed_memory
from replaykd.stages import options as O

app = typer.Typer(
    help="replaykd: offline knowledge distillation. Stage one caches a teacher's top-k targets for replayed "
    "augmented views; stage two trains students (any timm classifier; DeiT with its distillation token) on the "
    "identical views from that cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
cache_app = typer.Typer(help="Inspect, verify, repair, pack and upgrade teacher caches.", no_args_is_help=True,
                        add_completion=False, rich_markup_mode=None)
app.add_typer(cache_app, name="cache")

CONFIG_HELP = "YAML file of options (keys are the option names, e.g. 'batch_size: 128'); flags given on the " \
              "command line override it."


def load_config(path: Path) -> dict:
    """The options in a --config YAML file."""
    if not path.exists():
        raise ReplayKDError(f"--config file not found: {path}")
    return read_yaml_mapping(path, "--config", "option names to values")


def _parameter(f: dataclasses.Field, hint) -> inspect.Parameter:
    if O.list_item(hint) is not None:  # a flag given once per value (or arguments), parsed by the options class
        return _list_parameter(f, O.list_item(hint))
    base, _ = O._base(hint)
    # Parsed by the options class: a URL must not become a Path, a mapping is JSON, and a bad choice gets the
    # project's one-line error (typer's own is a usage box).
    choices = [m.value for m in base] if isinstance(base, type) and issubclass(base, Enum) else None
    if base in (O.Location, dict) or choices:
        base = hint = str
    metavar = f"<{'|'.join(choices)}>" if choices else None
    required = f.default is dataclasses.MISSING
    meta = f.metadata
    if meta["argument"]:
        info = typer.Argument(... if required else _plain(f.default), help=meta["help"], show_default=not required,
                              metavar=metavar or f.name.upper())
    else:
        # Required options are checked after --config is read, so the command line may leave them to the file.
        text = meta["help"] + (" [required]" if required else "")
        default = None if required else _plain(f.default)
        decls = meta["flags"] or ()
        if base is bool and not decls:
            flag = f.name.replace("_", "-")
            decls = (f"--{flag}/--no-{flag}",) if default else (f"--{flag}",)
        info = typer.Option(default, *decls, help=text, show_default=not required and default is not None,
                            metavar=metavar)
        hint = Optional[base]
    if base is bool:
        hint = bool
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=hint)


def _list_parameter(f: dataclasses.Field, item) -> inspect.Parameter:
    meta = f.metadata
    if meta["argument"]:
        info = typer.Argument(..., help=meta["help"], metavar=f.name.upper())
    else:
        base, _ = O._base(item)
        metavar = f"<{base.__name__}>" if base in (int, float) else "<str>"
        info = typer.Option(None, *(meta["flags"] or ()), help=meta["help"] + " [repeatable]", show_default=False,
                            metavar=metavar)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=List[str] if meta["argument"] else Optional[List[str]])


def _plain(value):
    return value.value if isinstance(value, Enum) else value


def command(cls: type[O.Options], target: str, *, config_file: bool = False):
    """A typer command whose options are `cls`'s fields; it resolves them (defaults, then --config, then the
    command line), checks them, and calls `target` ('module:function') with the options object."""
    hints = cls.hints()
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    params += [_parameter(f, hints[f.name]) for f in dataclasses.fields(cls)]
    if config_file:
        params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                        default=typer.Option(None, "--config", help=CONFIG_HELP)))

    def run(ctx: typer.Context, **kwargs) -> None:
        given = {k: v for k, v in kwargs.items() if k != "config"
                 and getattr(ctx.get_parameter_source(k), "name", None) in ("COMMANDLINE", "ENVIRONMENT")}
        values = load_config(kwargs["config"]) if kwargs.get("config") else {}
        where = f"--config {kwargs['config']}" if values else "the command line"
        values = {**{k.replace("-", "_"): v for k, v in values.items()}, **given}
        # Arguments always come from the command line.
        values.update({f.name: kwargs[f.name] for f in dataclasses.fields(cls) if f.metadata["argument"]})
        opts = cls.from_mapping({k: v.value if isinstance(v, Enum) else v for k, v in values.items()}, where)
        storage.configure(getattr(opts, "storage_options", None))
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(opts)

    run.__signature__ = inspect.Signature(params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__doc__ = cls.__doc__
    return run


app.command("shards")(command(O.ShardsOptions, "replaykd.stages.prepare:shards"))
app.command("manifest")(command(O.ManifestOptions, "replaykd.stages.prepare:manifest"))
app.command("views")(command(O.ViewsOptions, "replaykd.stages.inspect:views"))
app.command("train-teacher")(command(O.TrainTeacherOptions, "replaykd.stages.train_teacher:main", config_file=True))
app.command("teacher-cache")(command(O.TeacherCacheOptions, "replaykd.stages.teacher_cache:main", config_file=True))
cache_app.command("info")(command(O.CacheInfoOptions, "replaykd.stages.cache_info:info"))
cache_app.command("verify")(command(O.CacheVerifyOptions, "replaykd.stages.cache_tools:verify"))
cache_app.command("repair")(command(O.CacheRepairOptions, "replaykd.stages.cache_tools:repair"))
cache_app.command("pack")(command(O.CachePackOptions, "replaykd.stages.cache_layout:pack"))
cache_app.command("upgrade")(command(O.CacheUpgradeOptions, "replaykd.stages.cache_layout:upgrade"))
app.command("train-student")(command(O.StudentOptions, "replaykd.stages.train_student:main", config_file=True))
app.command("evaluate")(command(O.EvaluateOptions, "replaykd.stages.evaluate:main"))
app.command("report")(command(O.ReportOptions, "replaykd.stages.report:report"))
app.command("study-report")(command(O.StudyReportOptions, "replaykd.stages.study_report:study"))
app.command("bench")(command(O.BenchOptions, "replaykd.stages.bench.command:bench"))
app.command("bench-scale")(command(O.ScaleBenchOptions, "replaykd.stages.bench.scale:bench_scale"))


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Slurm and torchrun send to stop a process), stopping a command as Ctrl-C does."""


def _stop(signum, frame) -> None:
    # the first signal stops the command; later ones (torchrun answers Ctrl-C with a SIGTERM of its own) would cut
    # short the clean-up that keeps what is finished, so they are ignored from here on
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def main() -> None:
    """Console entry point: user errors become one clear line and exit code 2 (REPLAYKD_DEBUG=1: the traceback);
    Ctrl-C (SIGINT) and SIGTERM stop a command where it is, keeping what it finished (exit 130 and 143)."""
    # OpenMP threads that spin briefly before they sleep: a thread spinning long (libgomp's default) keeps its core
    # from whatever else runs there, and 2 threads on 2 cores then collapse beside any other job (the demo student,
    # 2 threads: 628 img/s alone, 102 beside one niced busy loop; 10,000 spins: 610 and 285; passive waits: 504 and
    # 388). Read when torch loads its OpenMP, so set before.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    reuse_freed_memory()
    # Slurm's preemption and `kill` send SIGTERM: stop as Ctrl-C does (loader workers stopped, the place and the
    # command that continues said), not at once with the workers left behind. And SIGINT stops a command even where
    # it started with SIGINT ignored (a background job of a script: `replaykd ... &`), as a user who sends it means.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        app()
    except Interrupted as exn:
        term = isinstance(exn.__context__, Terminated)
        typer.secho(f"stopped{' by SIGTERM' if term else ''}: {exn}", fg=typer.colors.YELLOW, err=True)
        sys.exit(143 if term else 130)
    except Terminated:
        typer.secho("stopped by SIGTERM", fg=typer.colors.YELLOW, err=True)
        sys.exit(143)
    except KeyboardInterrupt:
        typer.secho("stopped by Ctrl-C (SIGINT)", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except ReplayKDError as exn:
        if os.environ.get("REPLAYKD_DEBUG"):
            raise
        typer.secho(f"error: {exn}", fg=typer.colors.RED, err=True)
        sys.exit(2)
