"""Launch one training/eval function on N processes: ``--num-gpus N`` or ``torchrun``.

detectron2 0.6's ``launch`` is CUDA/NCCL-only. Here the backend follows the device the model runs
on (``MODEL.DEVICE``, passed by the entry point): NCCL for CUDA, gloo for CPU — also on a GPU
machine — so multi-process training also runs (and is tested) on a laptop.

* Under ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set) the current process joins the
  group from the environment; ``--num-gpus`` is ignored.
* Otherwise ``num_gpus > 1`` spawns that many local processes (one per GPU, or CPU workers).

Also the one home of the collective helpers the training code shares (the ATS difficulty table,
the training model's loss normalisers): every one of them works without a process group (then
it acts on this process alone) and on gloo (CPU) as on NCCL (CUDA).
"""

import logging
import os
from datetime import timedelta
from typing import Callable, List, Optional, Sequence, Tuple

import unsam.compat  # noqa: F401

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = timedelta(minutes=30)


def default_backend(device: Optional[str] = None) -> str:
    """NCCL for a CUDA ``device`` (default: CUDA when available), gloo otherwise."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def _init_group(
    rank: int, world_size: int, local_rank: int, local_size: int, init_method: str, backend: str
) -> None:
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=DEFAULT_TIMEOUT,
    )
    # detectron2's comm helpers (get_local_rank, ...) need the per-machine group
    machine = rank // local_size
    for i in range(world_size // local_size):
        group = dist.new_group(list(range(i * local_size, (i + 1) * local_size)))
        if i == machine:
            comm._LOCAL_PROCESS_GROUP = group
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    comm.synchronize()


def _spawned_worker(
    local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, backend, args
):
    rank = machine_rank * num_per_machine + local_rank
    _init_group(rank, world_size, local_rank, num_per_machine, dist_url, backend)
    main_func(*args)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence = (),
    device: Optional[str] = None,
):
    """Run ``main_func(*args)`` on every process; single process when world size is 1.

    ``device``: the model's device (``MODEL.DEVICE``), which picks the backend
    (:func:`default_backend`)."""
    backend = default_backend(device)
    if launched_by_torchrun():
        world_size = int(os.environ["WORLD_SIZE"])
        if world_size > 1:
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            _init_group(
                int(os.environ["RANK"]),
                world_size,
                int(os.environ["LOCAL_RANK"]),
                local_size,
                "env://",
                backend,
            )
        return main_func(*args)

    world_size = num_machines * num_gpus_per_machine
    if world_size <= 1:
        return main_func(*args)
    if backend == "nccl" and num_gpus_per_machine > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_gpus_per_machine} but only {torch.cuda.device_count()} GPUs visible"
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError(
                "dist_url=auto only works on one machine; pass --dist-url tcp://HOST:PORT"
            )
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.start_processes(
        _spawned_worker,
        nprocs=num_gpus_per_machine,
        args=(
            main_func,
            world_size,
            num_gpus_per_machine,
            machine_rank,
            dist_url,
            backend,
            tuple(args),
        ),
        daemon=False,
        start_method="spawn",
    )


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wrap in DistributedDataParallel when there is more than one process (CPU-safe)."""
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).is_cuda:
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    for buf in model.buffers():  # broadcast_buffers=False skips them even at init: random ones
        dist.broadcast(buf.data, src=0)  # (SAM's positional-encoding matrix) would differ per rank
    return torch.nn.parallel.DistributedDataParallel(model, **kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP (or the model itself)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


# ---------------------------------------------------------------------------------------------
# collectives that also run without a process group
# ---------------------------------------------------------------------------------------------
def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device() -> torch.device:
    """Where tensors of a collective must live: NCCL only moves CUDA tensors, gloo (CPU
    training, tests) CPU tensors."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_random_seed() -> int:
    """A random seed, identical on every rank (rank 0's, broadcast)."""
    seed = int(np.random.SeedSequence().generate_state(1)[0] % (2**31))
    if is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([seed], dtype=torch.int64, device=comm_device())
        dist.broadcast(t, src=0)
        seed = int(t.item())
    return seed


def all_gather_varlen(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank, in rank order (CPU result).

    Needs a process group (a collective: call on every rank)."""
    device = comm_device()
    world = dist.get_world_size()
    n = torch.tensor([t.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    longest = max(sizes_l)
    if longest == 0:
        return t.new_zeros(0)
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[: t.numel()] = t.to(device)
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s].cpu() for o, s in zip(out, sizes_l)])


def mean_over_ranks(values: Sequence[float], device: torch.device) -> List[float]:
    """``values`` averaged over the processes of the default group (themselves without one).

    One float64 all_reduce on ``device`` (the model's: NCCL needs CUDA tensors); a collective
    when a group exists, so every rank must call it the same number of times."""
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()
