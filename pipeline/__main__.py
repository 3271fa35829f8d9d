"""`python -m replaykd ...` runs the replaykd CLI (torchrun launches it this way: `torchrun ... -m replaykd`)."""
from replaykd.stages.cli import main

if __name__ == "__main__":
    main()
