"""`python -m stages ...` runs the replaykd CLI (torchrun launches it this way)."""
from stages.cli import main

main()
