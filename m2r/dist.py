"""Process-group setup in one place: who am I, how many are we, and helpers that keep ranks in step.

Three launch styles are recognised, in this order:
- `deepspeed` and `torchrun` export RANK / WORLD_SIZE / LOCAL_RANK;
- `srun` with one task per GPU exports SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which we copy
  into the torch variables (MASTER_ADDR = first host of the allocation, MASTER_PORT from the job);
- a bare `python script.py` is a world of one on 127.0.0.1 (instead of DeepSpeed's MPI discovery).
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import pickle
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, MutableMapping, Optional, Tuple

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "deepspeed" | "RANK/WORLD_SIZE" | "srun" | "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list, as `scontrol show hostnames | head -1` says: 'gpu[07-09,12],cpu1' ->
    'gpu07', 'rack[1-2]-n[3-4]' -> 'rack1-n3' (each bracket of the first item at its first value)."""
    first_item = re.match(r"(?:[^,\[]|\[[^\]]*\])+", nodelist.strip())
    if not first_item:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST '{nodelist}'")
    return re.sub(r"\[([^\]]*)\]", lambda brackets: re.split(r"[-,]", brackets.group(1))[0], first_item.group(0))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# This rank's place among its node's ranks: LOCAL_RANK until `device_for` makes that the GPU index DeepSpeed binds.
NODE_LOCAL_RANK = "M2R_NODE_LOCAL_RANK"


def rank_variables_launcher(environ: Mapping[str, str]) -> str:
    """Which launcher set RANK and WORLD_SIZE, from the variables only it adds (torchrun's elastic agent,
    and also `accelerate launch`, sets TORCHELASTIC_RUN_ID; the deepspeed launcher CROSS_RANK)."""
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ:
        return "deepspeed"
    return "RANK/WORLD_SIZE"


def discover_dist_env(environ: MutableMapping[str, str] = os.environ) -> DistEnv:
    """Find rank/world/local rank and export the variables torch.distributed's env:// init needs."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]),
                      int(environ.get("LOCAL_RANK", 0)), rank_variables_launcher(environ))
    elif int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        # An srun task (SLURM_STEP_ID is unset in the batch script itself, where a plain
        # `python pretrain.py` is a world of one, whatever the job's task count).
        env = DistEnv(int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]),
                      int(environ.get("SLURM_LOCALID", 0)), "srun")
        environ.setdefault("MASTER_ADDR", first_slurm_host(environ["SLURM_JOB_NODELIST"]))
        # Every task must compute the same port without talking to the others.
        environ.setdefault("MASTER_PORT", str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        env = DistEnv(0, 1, 0, "single")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    environ["RANK"], environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    environ["LOCAL_RANK"] = environ[NODE_LOCAL_RANK] = str(env.local_rank)
    return env


def device_for(env: DistEnv) -> torch.device:
    """The local rank's GPU; the only visible one when SLURM binds one GPU per task (--gpus-per-task=1)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    index = 0 if visible == 1 else env.local_rank
    if index >= visible:
        raise RuntimeError(f"local rank {env.local_rank} has no GPU: {visible} visible (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start one rank per GPU")
    torch.cuda.set_device(index)
    # DeepSpeed binds the GPU numbered LOCAL_RANK (its process group and its engine), not the current one.
    os.environ["LOCAL_RANK"] = str(index)
    return torch.device("cuda", index)


def _skip_deepspeed_shm_build() -> None:
    # DeepSpeed's CPU comm backend JIT-compiles a shared-memory op (40-90 s) that training never uses.
    # Patch the module object in sys.modules: `import deepspeed.comm.torch as m` binds torch itself.
    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def name_deepspeeds_accelerator() -> None:
    """Without CUDA, tell DeepSpeed its accelerator is the CPU before it is imported (it would guess so and
    print a warning from every process). Call it before the first `import deepspeed`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(env: DistEnv, timeout: Optional[datetime.timedelta] = None) -> torch.device:
    """Start DeepSpeed's process group (nccl on GPUs, gloo on CPU) and return this rank's device.
    `timeout`: how long a collective may wait, in every group DeepSpeed creates (its default: 10 minutes)."""
    name_deepspeeds_accelerator()
    _skip_deepspeed_shm_build()
    allow_open_files(env)
    import deepspeed

    device = device_for(env)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               auto_mpi_discovery=False, **({"timeout": timeout} if timeout else {}))
    if timeout:
        _give_new_groups_the_timeout(timeout)
    from m2r import failure_watch   # (it imports this module)

    failure_watch.start()
    return device


FILES_BESIDE_THE_STORE = 256   # what a rank opens itself: checkpoint files, data workers' shared tensors


def allow_open_files(env: DistEnv) -> None:
    """Raise the soft limit on open files to the hard one. The store's host (rank 0's process, or torchrun's
    agent) holds two connections per rank (the process's and its failure watch's), beside the files it opens
    itself; 1024, a common soft limit that srun passes on, is exceeded at 512 ranks. Warns on rank 0 where the
    hard limit is too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20   # Linux's own ceiling (fs.nr_open)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):   # refused (a container's policy): the warning below
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    needed = 2 * env.world_size + FILES_BESIDE_THE_STORE
    if soft != resource.RLIM_INFINITY and soft < needed and env.rank == 0:
        print(f"WARNING: open files are limited to {soft} (ulimit -n), below the {needed} that rank 0's process "
              f"may need as the store's host for {env.world_size} ranks: raise the hard limit", flush=True)


def _give_new_groups_the_timeout(timeout: datetime.timedelta) -> None:
    """The default group has `timeout`, but DeepSpeed creates the groups a training step runs its
    collectives in (expert all-to-all, expert and data-parallel gradient reductions) with torch's default
    instead (10 minutes on NCCL): its backend's `new_group` now passes `timeout` on."""
    from deepspeed.comm import comm as deepspeed_comm

    deepspeed_comm.cdb.new_group = lambda ranks, **options: torch_dist.new_group(ranks, timeout=timeout, **options)


def is_multi_rank() -> bool:
    return is_initialized() and world_size() > 1


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


# How long the main thread hands the GIL to gloo's worker threads before the interpreter exits.
GLOO_DRAIN_SECONDS = 0.2


def destroy_process_group() -> None:
    """End the process group once a run has finished cleanly (every entry point does).

    Not after an exception: other ranks may be inside a collective, and destroying the group under
    them can deadlock the exit. On gloo, also let its worker threads finish: a worker frees a finished
    collective's work (and the tensors Python has already dropped) only once it holds the GIL, and one
    still waiting for the GIL when the interpreter finalises aborts a run that succeeded (SIGABRT,
    "terminate called without an active exception", seen in 1 of 10-15 two-rank CPU runs). torch
    cannot stop gloo's threads (destroy_process_group leaves them running), so the main thread sleeps,
    GIL released, long enough for them to take it.
    """
    from m2r import failure_watch

    failure_watch.end_cleanly()
    if not is_initialized():
        return
    on_gloo = "gloo" in torch_dist.get_backend()   # "gloo", or a per-device string like "cpu:gloo,cuda:nccl"
    torch_dist.destroy_process_group()
    if on_gloo:
        time.sleep(GLOO_DRAIN_SECONDS)


def rank() -> int:
    """This process's rank; before the process group starts, the launcher's (RANK, or srun's
    SLURM_PROCID; 0 without one)."""
    if is_initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def world_size() -> int:
    """The ranks in the process group; 1 until it starts (collectives are no-ops then), unlike `rank`,
    which reads the launcher's variables so that start-up prints come from rank 0 alone."""
    return torch_dist.get_world_size() if is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def is_local_rank0() -> bool:
    """The first rank of its node (from the launcher's LOCAL_RANK or SLURM_LOCALID, see `discover_dist_env`)."""
    return int(os.environ.get(NODE_LOCAL_RANK, os.environ.get("LOCAL_RANK", "0"))) == 0


def print0(*args: Any, **kwargs: Any) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


_announced: set = set()


def announce_once(message: str) -> None:
    """Print a decision (dtype, kernel, fallback) once per process, from rank 0.

    Silent while torch.compile traces: a print there would split the compiled graph. A decision
    made only inside a compiled forward is therefore announced at the next eager call (validation).
    """
    if torch.compiler.is_compiling() or message in _announced:
        return
    _announced.add(message)
    print0(message)


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def _collective_device() -> torch.device:
    # gloo reduces CPU tensors; nccl needs them on the GPU.
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def max_over_ranks(value: float) -> float:
    """The largest of every rank's `value` (all_reduce MAX, float64), on every rank: call it on all ranks."""
    if not is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor.item()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a tensor on any device, as a CPU tensor (`values` itself is
    untouched): call it on all ranks. One device-to-host copy when `values` is on the collective device."""
    if not is_initialized():
        return values.cpu()
    buffer = values.to(_collective_device(), copy=True)
    torch_dist.all_reduce(buffer)
    return buffer.cpu()


def all_reduce_in_group_(tensor: torch.Tensor, group: Any) -> None:
    """In-place element-wise sum of a tensor on the collective device over `group` (a DeepSpeed data- or
    expert-data-parallel group): call it on every rank of that group."""
    if is_initialized() and torch_dist.get_world_size(group) > 1:
        torch_dist.all_reduce(tensor, group=group)


def all_gather_object(obj: Any) -> List[Any]:
    if not is_initialized():
        return [obj]
    gathered: List[Any] = [None] * world_size()
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def problem_of_any_rank(problem: Optional[str]) -> Optional[str]:
    """The first rank's `problem` (a short message; None: none), the same on every rank, naming that rank when
    several run: a check whose outcome differs per rank (each holds its own experts) then fails on all of them,
    not on some while the others go on into the next collective. Call it on every rank."""
    problems = all_gather_object(problem)
    found = [(rank_index, text) for rank_index, text in enumerate(problems) if text is not None]
    if not found:
        return None
    first_rank, first = found[0]
    if len(problems) == 1:
        return first
    others = f" and {len(found) - 1} more of the {len(problems)} ranks" if len(found) > 1 else ""
    return f"{first} (on rank {first_rank}{others})"


def groups_spanning_hosts(group_size: int) -> List[Tuple[int, List[str]]]:
    """(first rank, hosts) of each group of `group_size` consecutive ranks (how DeepSpeed forms its
    expert-parallel groups) whose ranks are on more than one host. Call it on every rank."""
    hosts = all_gather_object(socket.gethostname())
    spans = [(first, sorted(set(hosts[first:first + group_size]))) for first in range(0, len(hosts), group_size)]
    return [(first, names) for first, names in spans if len(names) > 1]


def on_rank0(work: Callable[[], Any]) -> Any:
    """`work()` on rank 0 alone, its result on every rank. What it raises (a missing file, a refused
    setting) is raised on every rank, which would otherwise wait for rank 0 forever."""
    if not is_initialized():   # one process
        return work()
    outcome, own_error = None, None
    if is_rank0():
        try:
            outcome = work()
        except Exception as error:
            outcome, own_error = _Raised(error), error
    outcome = broadcast_object(outcome)
    if own_error is not None:
        raise own_error   # rank 0 keeps its traceback
    if isinstance(outcome, _Raised):
        raise outcome.error
    return outcome


def failing_together(work: Callable[[], Any]) -> Any:
    """`work()` on every rank, holding no collective of its own (a read of each node's copy of some files): what it
    raises on any rank is raised on every rank, as the first failing rank's error naming that rank (a failing
    rank's own error is its cause), where the others would go on into their next collective and end there (a
    broken connection, the failure watch). One collective: call it on every rank."""
    outcome, own_error = None, None
    try:
        outcome = work()
    except Exception as error:
        own_error = error
    if not is_multi_rank():   # one process, in a process group of its own or none: no other rank to name
        if own_error is not None:
            raise own_error
        return outcome
    raised = all_gather_object(None if own_error is None else _Raised(own_error, rank()))
    failed = next((index for index, item in enumerate(raised) if item is not None), None)
    if failed is None:
        return outcome
    error = _naming_rank(own_error if failed == rank() else raised[failed].error, failed)
    raise error from (own_error if own_error is not error else None)


def _naming_rank(error: Exception, rank_index: int) -> Exception:
    """`error` of another rank, its message ending with that rank, as the same type (a user's error stays one)."""
    try:
        return type(error)(f"{error} (on rank {rank_index})")
    except Exception:   # a type that takes other arguments: as it was
        return error


class _Raised:
    """An exception of one rank's, to be raised on the other ranks: itself when it survives pickling
    (broadcast_object and all_gather_object pickle), else a RuntimeError that says what it was."""

    def __init__(self, error: Exception, rank_index: int = 0):
        try:
            pickle.loads(pickle.dumps(error))
            self.error = error
        except Exception:
            self.error = RuntimeError(f"on rank {rank_index}: {type(error).__name__}: {error}")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src` decides, everybody gets its value (e.g. a resume path seen on a shared filesystem)."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]
