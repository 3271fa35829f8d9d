"""The wheel is the product: built from the repository, installed into a fresh virtual environment (no editable
install, no repository on the path), it runs the command line and the public API from its own files."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# what a clean clone holds of the repository, without what runs and builds leave in it
LEFT_BEHIND = shutil.ignore_patterns(".git", ".venv", "data", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".pillow-simd", "site")

# Run in the fresh environment, from a folder that is not the repository: the three commands through the command
# line's own entry point (in one process: starting Python with torch costs seconds), then the public API.
DRIVER = """
import importlib.util, sys
import replaykd
from replaykd.stages.cli import main

def cli(*args):
    sys.argv = ["replaykd", *map(str, args)]
    try:
        main()
    except SystemExit as exn:
        assert not exn.code, f"replaykd {' '.join(map(str, args))} exited with {exn.code}"

teacher = sys.argv[1]
cli("shards", "digits", "data", "--shard-size", 400)
cli("teacher-cache", "--manifest", "data", "--recipe", "digits", "--teacher", "regnety_002", "--checkpoint", teacher,
    "--epochs", 1, "--topk", 3, "--batch-size", 128, "--workers", 0, "--device", "cpu", "--out", "cache.zarr")
cli("train-student", "--manifest", "data", "--cache", "cache.zarr", "--recipe", "digits", "--epochs", 1,
    "--patch-size", 4, "--depth", 1, "--embed-dim", 32, "--num-heads", 2, "--batch-size", 64, "--workers", 0,
    "--device", "cpu", "--eval-split", "none", "--out", "student")
from replaykd import DistillationLoss, ReplayLoader
loader = ReplayLoader("data", "digits", "cache.zarr", batch_size=64, workers=0, device="cpu")
batch = next(iter(loader))
print("FROM", replaykd.__file__)
print("VERSION", replaykd.__version__)
print("BATCH", len(batch), batch.teacher.probs.shape[1])
print("OURS", [importlib.util.find_spec(name) for name in ("pipeline", "stages")])
"""


def test_the_wheel_installs_into_a_fresh_environment_and_runs_from_there(tmp_path, teacher_ckpt):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=LEFT_BEHIND)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    tmp_path / "dist", src], check=True, capture_output=True, text=True)
    wheel, = (tmp_path / "dist").glob("replaykd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"replaykd", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "replaykd/recipes/deit.yaml" in names and "replaykd/stages/cli.py" in names

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", env], check=True)
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    # the dependencies (torch, timm, ...) from the test environment's site-packages, after the fresh one's own
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "work"
    work.mkdir()
    for command in ([env / "bin" / "replaykd", "--help"], [python, "-m", "replaykd", "--help"]):  # torchrun: -m
        help_ = subprocess.run(command, capture_output=True, text=True, cwd=work)
        assert help_.returncode == 0 and "teacher-cache" in help_.stdout and "train-student" in help_.stdout
    proc = subprocess.run([python, "-c", DRIVER, teacher_ckpt], capture_output=True, text=True, cwd=work,
                          env={"PATH": f"{env / 'bin'}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ")[0].isupper())
    assert lines["FROM"].startswith(str(site)) and lines["VERSION"] == _version()
    assert lines["BATCH"] == "64 3" and lines["OURS"] == "[None, None]"
    assert (work / "student" / "summary.json").exists() and (work / "cache.zarr").is_dir()


def _version() -> str:
    import replaykd

    return replaykd.__version__
