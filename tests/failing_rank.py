"""Two ranks started as `srun` without --kill-on-bad-exit starts them: nothing kills the others when one
fails (tests/test_failing_rank.py). `python tests/failing_rank.py raise|hang TIMEOUT_SECONDS` with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.

raise: rank 1 raises; rank 0 sleeps, standing in for an NCCL collective, which does not notice that a peer
       has exited (gloo's would fail at once).
hang:  rank 1 hangs (a stuck read); rank 0's barrier times out after TIMEOUT_SECONDS and raises.
"""
import datetime
import sys
import time

from m2r import dist
from m2r.cli import run_main


def main(argv=None) -> int:
    mode, timeout = sys.argv[1], datetime.timedelta(seconds=float(sys.argv[2]))
    dist.init_distributed(dist.discover_dist_env(), timeout)
    me = dist.rank()
    if me == 2:   # a third rank's watch looks 2.5 s after rank 0's (in a long run their phases drift apart)
        time.sleep(2.5)
        dist.stop_failure_watch()
        dist.start_failure_watch()
    dist.barrier()
    print(f"rank {me}: started", flush=True)
    if me == 1:
        if mode == "raise":
            raise OSError("No space left on device: rank 1's checkpoint shard")
        while True:
            time.sleep(1)
    if mode == "raise":
        time.sleep(600)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    run_main(main)
