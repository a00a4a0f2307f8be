"""Pretrain M2Restore: `python pretrain.py --help` prints the commands (m2r/pretrain.py, whose docstring
they are); an installed m2r runs the same as `python -m m2r.pretrain` or `m2r-pretrain`."""
from m2r.cli import run_main
from m2r.pretrain import main

if __name__ == "__main__":
    run_main(main)
