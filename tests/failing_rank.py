"""Two ranks started as `srun` without --kill-on-bad-exit starts them: nothing kills the others when one
fails (tests/test_failing_rank.py). `python tests/failing_rank.py raise|hang TIMEOUT_SECONDS` with
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.

raise: rank 1 raises; rank 0 sleeps, standing in for an NCCL collective, which does not notice that a peer
       has exited (gloo's would fail at once).
user:  the same with a user error (a full disk: one line, exit 2, no traceback).
collective: rank 1 raises; the others wait in a gloo barrier, which fails at once when rank 1 exits (as NCCL's
       does where it detects a peer's exit): their own error is a consequence, the cause is rank 1's. Every
       watch is stopped first: one looking between rank 1's announcement and that failure (about 0.1 s of
       its 5 s period) would end the rank before the rank's own error is reported.
hang:  rank 1 hangs (a stuck read); rank 0's barrier times out after TIMEOUT_SECONDS and raises.
group: rank 1 raises; the others wait in the store, setting up a new process group (as NCCL's first collective
       on a group waits for its unique id): the process's store client is busy, the watch must not need it.
late:  no failure; rank 1 ends 8 s after rank 0 (a slower teardown), longer than the watch's look.
accelerate: as user, in the process world Accelerate starts for m2r.evaluate and m2r.restore (a full disk
       under one process's --save-images), launched without an agent that would end the others.
"""
import datetime
import sys
import time

from m2r import dist, failure_watch
from m2r.atomic import StorageError
from m2r.cli import run_main


def main(argv=None) -> int:
    mode, timeout = sys.argv[1], datetime.timedelta(seconds=float(sys.argv[2]))
    if mode == "accelerate":
        from m2r.eval.loading import make_accelerator

        make_accelerator(None, cpu=True)
    else:
        dist.init_distributed(dist.discover_dist_env(), timeout)
    me = dist.rank()
    if me == 2:   # a third rank's watch looks 2.5 s after rank 0's (in a long run their phases drift apart)
        time.sleep(2.5)
        failure_watch.stop()
        failure_watch.start()
    if mode == "collective":
        failure_watch.stop()
    dist.barrier()
    print(f"rank {me}: started", flush=True)
    if me == 1 and mode != "late":
        if mode in ("raise", "collective", "group"):
            raise OSError("No space left on device: rank 1's checkpoint shard")
        if mode in ("user", "accelerate"):
            raise StorageError("No space left on device: rank 1's checkpoint shard")
        while True:
            time.sleep(1)
    if mode in ("raise", "user", "accelerate"):
        time.sleep(600)
    if mode == "group":
        import torch.distributed

        torch.distributed.new_group(list(range(dist.world_size())))
    dist.barrier()
    if mode == "late" and me == 1:
        time.sleep(8)
    dist.destroy_process_group()
    print(f"rank {me}: done", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
