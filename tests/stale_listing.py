"""An entry point (pretrain.py, finetune.py or `-m m2r.<tool>`) run as a job in which every rank but 0
sees a stale listing of the data folders (the last image or shard of each missing, as a stale NFS cache
or a copy in progress would show them). Launched by tests:

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/stale_listing.py finetune.py --config ... [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 tests/stale_listing.py -m m2r.restore ...
"""
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

if os.environ.get("RANK", "0") != "0":
    import m2r.data.images as images
    import m2r.data.stream as stream
    import m2r.eval.datasets as datasets

    full_listing, all_shards = images.list_image_files, stream.resolve_shards
    # Modules importing it later (a tool run with -m is executed afresh) take the stale one too.
    images.list_image_files = datasets.list_image_files = lambda *args, **kw: full_listing(*args, **kw)[:-1]
    stream.resolve_shards = lambda *args: all_shards(*args)[:-1]

if sys.argv[1] == "-m":
    sys.argv = [sys.argv[2], *sys.argv[3:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = [str(REPO / sys.argv[1]), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
