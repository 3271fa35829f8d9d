"""Compute threads shared among the replaykd processes on one machine (seats held by live processes only)."""
import os
import signal
import subprocess
import sys

from replaykd.threads import cores

# a process that takes its share, waits for a line, and takes it again
SHARE = ("import sys; from replaykd.threads import share; print(share(None), flush=True); sys.stdin.readline(); "
         "print(share(None), flush=True); sys.stdin.readline()")


def start(env):
    proc = subprocess.Popen([sys.executable, "-c", SHARE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    return proc, int(proc.stdout.readline())


def again(proc):
    proc.stdin.write("\n")
    proc.stdin.flush()
    return int(proc.stdout.readline())


def test_runs_share_the_cores_and_a_killed_run_gives_its_share_back(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "LOCAL_WORLD_SIZE": "1"}
    n = cores()
    a, alone = start(env)
    assert alone == n  # one run alone takes every core, its loader workers not subtracted
    b, second = start(env)
    assert second == max(1, n // 2) and again(a) == max(1, n // 2)  # the earlier run follows at its next epoch
    b.send_signal(signal.SIGKILL)
    b.wait()
    c, third = start(env)  # the killed run's seat is free: two computing, not three
    assert third == max(1, n // 2)
    seats = sorted(p.name for p in (tmp_path / f"replaykd-{os.getuid()}" / "compute").iterdir())
    assert len(seats) == 2 and not any(s.startswith(f"{b.pid}-") for s in seats)
    for p in (a, c):
        p.kill()
        p.wait()
    d, last = start({**env, "LOCAL_WORLD_SIZE": "2"})  # torchrun's processes on this machine share it too
    assert last == max(1, n // 2)
    d.kill()
    d.wait()


def test_threads_given_are_taken_as_they_are():
    from replaykd.threads import share

    assert share(3) == 3
