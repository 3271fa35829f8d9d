"""`python -m replaykd.stages ...` runs the replaykd CLI, as `python -m replaykd` does."""
from replaykd.stages.cli import main

if __name__ == "__main__":
    main()
