"""Finetune M2Restore: `python finetune.py --help` prints the commands (m2r/finetune.py, whose docstring
they are); an installed m2r runs the same as `python -m m2r.finetune` or `m2r-finetune`."""
from m2r.cli import run_main
from m2r.finetune import main

if __name__ == "__main__":
    run_main(main)
