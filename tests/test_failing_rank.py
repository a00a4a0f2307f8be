"""A rank that fails ends every rank within seconds, whatever launched them (m2r.dist's failure watch):
srun without --kill-on-bad-exit kills no survivor, and NCCL does not notice a peer's exit."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2r.dist import free_port

REPO = Path(__file__).resolve().parents[1]
BOUND = 90   # seconds; without the watch, these runs end only at the test's timeout (or never)


def launch_ranks(mode, timeout_seconds=10, count=2):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), WORLD_SIZE=str(count),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    started = time.monotonic()
    ranks = [subprocess.Popen([sys.executable, "tests/failing_rank.py", mode, str(timeout_seconds)], cwd=REPO,
                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(count)]
    results = []
    try:
        for process in ranks:
            output, _ = process.communicate(timeout=max(1, BOUND - (time.monotonic() - started)))
            results.append((process.returncode, output))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{mode}: a rank was still running after {BOUND} s")
    finally:
        for process in ranks:
            process.kill()
    return results, time.monotonic() - started


def test_a_rank_that_raises_ends_the_ranks_waiting_for_it():
    (code0, out0), (code1, out1) = launch_ranks("raise")[0]
    assert code1 == 1 and "OSError: No space left on device: rank 1's checkpoint shard" in out1
    assert code0 == 1, out0
    assert "rank 0: stopping because rank 1 failed: OSError: No space left on device" in out0


def test_a_rank_that_hangs_is_ended_once_the_others_time_out():
    (code0, out0), (code1, out1) = launch_ranks("hang")[0]
    assert code0 == 1 and "Timed out" in out0, out0
    assert code1 == 1, out1
    assert "rank 1: stopping because rank 0 failed: RuntimeError" in out1
    assert "this rank was in failing_rank.py:" in out1   # where the hung rank was stuck


def test_rank_0_hosting_the_store_waits_for_every_rank_to_see_a_failure_before_it_exits():
    """Under srun and the deepspeed launcher rank 0's process hosts the store: exiting at once when it sees
    rank 1's failure would leave rank 2, whose watch looks later, in its collective (it only reads errors
    from a store that is gone)."""
    (code0, out0), (code1, out1), (code2, out2) = launch_ranks("raise", count=3)[0]
    assert code1 == 1 and code0 == 1, out0
    assert code2 == 1 and "rank 2: stopping because rank 1 failed: OSError" in out2, out2
