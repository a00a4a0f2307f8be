"""finetune.py as a 2-rank job in which every rank but 0 sees a stale listing of the dataset folders
(the last image of each folder missing, as a stale NFS cache or a copy in progress would show them).
Launched by tests/test_finetune.py:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/finetune_stale_listing.py --config ... [key=value ...]
"""
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if os.environ.get("RANK", "0") != "0":
    import m2r.eval.datasets as datasets

    full_listing = datasets.list_image_files
    datasets.list_image_files = lambda folder: full_listing(folder)[:-1]

sys.argv[0] = str(REPO / "finetune.py")
runpy.run_path(sys.argv[0], run_name="__main__")
