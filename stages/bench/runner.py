"""How the benchmarks run replaykd commands: the one place outside `stages/cli.py` that reaches the command line."""
from __future__ import annotations

import contextlib
import io
import subprocess
import sys

from replaykd.errors import ReplayKDError
from replaykd.stages.cli import main

# A replaykd command in a fresh process, as users (and torchrun) start it.
CLI = [sys.executable, "-m", "replaykd"]


def replaykd(*args, fresh: bool = True) -> str:
    """Run a replaykd command in a fresh process, as a user would (or, not `fresh`, through the same entry point in
    this process, when only the bench's own code is being checked); its stdout (a failure is an error)."""
    args = [str(a) for a in args]
    if fresh:
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        stdout, stderr, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
        sys.argv = ["replaykd", *args]
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                main()
        except SystemExit as exn:
            code = exn.code if isinstance(exn.code, int) else int(exn.code is not None)
        finally:
            sys.argv = argv
        out, err = stdout.getvalue(), stderr.getvalue()
    if code:
        raise ReplayKDError(f"replaykd {args[0]} failed during the bench:\n{err[-3000:]}")
    return out
