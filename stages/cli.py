"""The `replaykd` command: each stage module contributes its commands."""
from __future__ import annotations

import sys

import typer

from pipeline.errors import ReplayKDError
from stages import bench, cache_tools, inspect, prepare, report, teacher_cache, train_student, train_teacher

app = typer.Typer(
    help="replaykd: offline knowledge distillation. Stage one caches a teacher's top-k targets for replayed "
    "augmented views; stage two trains DeiT students on the identical views from that cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("shards")(prepare.shards)
app.command("manifest")(prepare.manifest)
app.command("views")(inspect.views)
app.command("train-teacher")(train_teacher.train_teacher)
app.command("teacher-cache")(teacher_cache.teacher_cache)
app.add_typer(cache_tools.app, name="cache")
app.command("train-student")(train_student.train_student)
app.command("report")(report.report)
app.command("bench")(bench.bench)


def main() -> None:
    """Console entry point: user errors become one clear line and exit code 2."""
    try:
        app()
    except ReplayKDError as exn:
        typer.secho(f"error: {exn}", fg=typer.colors.RED, err=True)
        sys.exit(2)
