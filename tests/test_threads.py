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


def test_a_gpu_rank_leaves_its_workers_their_cores(tmp_path, monkeypatch):
    # 8 ranks with 10 loader workers each on a 64-core node took 8 threads each beside 80 busy workers
    from replaykd import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "seats_folder", lambda: tmp_path / "seats")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.share(None, workers=10, on_gpu=True) == 1
    assert threads.share(None, workers=3, on_gpu=True) == 5
    assert threads.share(None, workers=10) == 8  # on the CPU the process does the arithmetic: its whole share
    monkeypatch.setattr(threads, "cpu_quota", lambda: 12.5)  # a container limited to 12.5 cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert threads.cores() == 12 and threads.share(None) == 12


# a process that takes its share on a faked 64-core machine, of which its scheduler gave it the cores in argv, and
# again at each line it reads
FAKED = ("import os, sys; cpus = set(range(*map(int, sys.argv[1:3]))); os.sched_getaffinity = lambda pid: cpus; "
         "from replaykd import threads; threads.cpu_quota = lambda: None; print(threads.share(None), flush=True)\n"
         "while sys.stdin.readline(): print(threads.share(None), flush=True)")


def test_jobs_on_cores_of_their_own_do_not_halve_each_other(tmp_path):
    # the seats are per user: two jobs of one user that a scheduler gave separate cores took half of theirs each
    env = {**os.environ, "TMPDIR": str(tmp_path), "LOCAL_WORLD_SIZE": "1"}

    def job(first, last):
        proc = subprocess.Popen([sys.executable, "-c", FAKED, str(first), str(last)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        return proc, int(proc.stdout.readline())

    (a, alone), (b, beside) = job(0, 32), job(32, 64)
    try:
        assert alone == beside == 32 and again(a) == 32
        c, whole = job(0, 64)  # a job on all 64 shares with both
        assert whole == 64 // 3 and again(a) == again(b) == 16
        c.kill()
        c.wait()
    finally:
        for p in (a, b):
            p.kill()
            p.wait()


def test_a_cgroup_quota_caps_the_cores(tmp_path):
    from replaykd.threads import cpu_quota

    (tmp_path / "proc").write_text("0::/job/step\n")
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "cpu.max").write_text("400000 100000\n")  # 4 cores for the job
    (v2 / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path / "proc", v2) == 4.0
    (tmp_path / "proc").write_text("1:cpu,cpuacct:/job\n")
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)  # inside a container: the host's path is not there, its own cgroup is the root
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path / "proc", tmp_path / "v1") == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota(tmp_path / "proc", tmp_path / "v1") is None
