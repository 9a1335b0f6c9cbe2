"""Scale-out with torchrun: data-parallel training (DDP) or ensemble members spread over ranks.

`torchrun --standalone --nproc-per-node N -m lungxray train ...` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set; `setup()` reads them and joins the process group (`gloo` on
CPU, `nccl` on CUDA, one GPU per local rank). Without those variables every helper here is a no-op, so `fit()`
keeps one code path for one process and for many.

Two strategies, chosen with the environment variable LUNGXRAY_DISTRIBUTE:

- `data` (default): every rank holds the whole packed network; each global batch (`train.batch_size` images
  per member) is cut into one contiguous shard per rank, augmented with the parameters the whole batch would
  get in one process, and DistributedDataParallel averages the gradients. Validation images are sharded too and
  the per-member sums all-reduced, so every rank takes the same early-stopping and learning-rate decisions.
  Rank 0 writes checkpoints and the bundle. BatchNorm statistics are per rank (as with DDP on any framework).
- `members`: rank r trains its own slice of the ensemble members as a smaller packed network (no gradient
  traffic at all); at the end rank 0 gathers the members, stacks them with `models.stack_members` and
  calibrates, scores and writes the bundle exactly as a single-process run does.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lungxray.hostinfo import usable_cores
from lungxray.models.nets import build_model, extract_member, stack_members
from lungxray.training.plan import MemberPlan
from lungxray.transforms.geometric import Augmenter

log = logging.getLogger(__name__)

__all__ = [
    "STRATEGIES",
    "DistContext",
    "all_reduce_sum",
    "batch_shard",
    "collect_members",
    "context",
    "data_world",
    "local_share",
    "setup",
    "share_from_main",
    "should_write",
    "shutdown",
    "sync_buffers",
    "wrap",
]

ENV_STRATEGY = "LUNGXRAY_DISTRIBUTE"
STRATEGIES = ("data", "members")


@dataclass
class DistContext:
    """Where this process sits in the job; the defaults describe a plain single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    strategy: str = "data"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def data_parallel(self) -> bool:
        return self.active and self.strategy == "data"

    @property
    def members_over_ranks(self) -> bool:
        return self.active and self.strategy == "members"

    @property
    def threads(self) -> int:
        """CPU threads per rank: the cores split between the ranks of this node (0 = runtime default)."""
        if not self.active:
            return 0
        cores = usable_cores()
        return max(1, cores // self.local_world)


_CTX = DistContext()


def context() -> DistContext:
    """The current process's place in the job (a single-process context before/without `setup`)."""
    return _CTX


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as exc:
        raise RuntimeError(f"{name}={value!r} is not an integer (set by torchrun)") from exc


def setup(device: torch.device) -> DistContext:
    """Join the torchrun job described by the environment, if any; returns the context (device per rank).

    Idempotent: a second call (e.g. several runs in one process) reuses the process group.
    """
    global _CTX
    world = _env_int("WORLD_SIZE", 1)
    strategy = os.environ.get(ENV_STRATEGY, "data").strip().lower() or "data"
    if strategy not in STRATEGIES:
        raise ValueError(f"{ENV_STRATEGY}={strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if world <= 1:
        _CTX = DistContext(device=device, strategy=strategy)
        return _CTX
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    _CTX = DistContext(rank, world, local_rank, local_world, strategy, device)
    if rank != 0:  # one log, not N interleaved copies; warnings still show
        logging.getLogger("lungxray").setLevel(logging.WARNING)
    log.info("distributed: %d ranks (%s, %s), strategy %s", world, dist.get_backend(), device, strategy)
    return _CTX


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the process group (all ranks) and return to the single-process context."""
    global _CTX
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _CTX = DistContext()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. decodes and caches the dataset); the others follow and read its cache."""
    if _CTX.active and not _CTX.is_main:
        dist.barrier()
    yield
    if _CTX.active and _CTX.is_main:
        dist.barrier()


# ------------------------------------------------------------------------------------ data-parallel hooks
def data_world() -> int:
    """How many ranks share each batch: the world size under the `data` strategy, else 1."""
    return _CTX.world if _CTX.data_parallel else 1


def batch_shard(batch: int) -> tuple[int, int]:
    """This rank's columns [lo, hi) of a global batch of `batch` images per member (as even as possible)."""
    w, r = data_world(), _CTX.rank if _CTX.data_parallel else 0
    return r * batch // w, (r + 1) * batch // w


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel ranks (every rank gets the same values); the tensor itself otherwise."""
    if not _CTX.data_parallel:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around the model under the `data` strategy (gradients averaged over ranks)."""
    if not _CTX.data_parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [_CTX.device.index] if _CTX.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, *more: torch.Tensor) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics), and `more` tensors (e.g. a weight average, which
    averages those statistics too), to every rank, so all ranks validate one model."""
    if not _CTX.data_parallel:
        return
    for buf in (*model.buffers(), *more):
        dist.broadcast(buf, src=0)


def should_write() -> bool:
    """Whether this rank writes checkpoints: rank 0 under `data` (one model), every rank under `members`."""
    return not _CTX.data_parallel or _CTX.is_main


def share_from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (e.g. the run's metrics); `obj` itself in one process."""
    if not _CTX.active:
        return obj
    box = [obj if _CTX.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------- members over ranks
def member_share(members: int, rank: int | None = None, world: int | None = None) -> list[int]:
    """The ensemble members rank `rank` trains under the `members` strategy (contiguous, as even as possible)."""
    r = _CTX.rank if rank is None else rank
    w = _CTX.world if world is None else world
    if members < w:
        raise ValueError(
            f"ensemble.members={members} cannot be spread over {w} ranks; use at least as many members as ranks "
            f"or {ENV_STRATEGY}=data"
        )
    return list(range(r * members // w, (r + 1) * members // w))


def local_share(
    plan: MemberPlan, model: nn.Module, augmenter: Augmenter, packed: bool = True
) -> tuple[MemberPlan, nn.Module, list[int]]:
    """(plan, model, member ids) this rank trains: everything, or its members as a smaller packed network.

    The smaller network starts from the same initial weights as those members of `model`, so where a member
    ends up does not depend on which rank trained it; its augmentations and dropout draw from rank-own seeds.
    """
    ks = list(range(plan.members))
    if not _CTX.members_over_ranks:
        return plan, model, ks
    if not packed:
        raise ValueError(f"{ENV_STRATEGY}=members spreads packed members; it needs ensemble.packed=true")
    augmenter.generator.manual_seed(augmenter.generator.initial_seed() + 1000 * _CTX.rank)
    ks = member_share(plan.members)
    local_plan = MemberPlan(plan.train_index[ks], plan.val_mask[ks], plan.bootstrap)
    members = plan.members
    full = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    local = build_model(**{**model.build_args, "members": len(ks)})  # type: ignore[arg-type, dict-item]
    local.load_state_dict(stack_members([extract_member(full, k, members) for k in ks]))
    param = next(model.parameters())
    local = local.to(param.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    torch.manual_seed(torch.initial_seed() + 7919 * _CTX.rank)  # own dropout draws per rank
    return local_plan, local, ks


def collect_members(local: nn.Module, model: nn.Module, state: Any, ks: list[int]) -> Any:
    """Gather every rank's trained members into `model` (rank 0) and merge the training states.

    Returns the merged state on every rank (per-member lists in member order, history tagged with `rank`).
    """
    if not _CTX.members_over_ranks:
        return state
    sd = {k: v.detach().cpu() for k, v in local.state_dict().items()}
    piece = {"ks": ks, "members": [extract_member(sd, i, len(ks)) for i in range(len(ks))], "state": state}
    pieces: list[Any] = [None] * _CTX.world
    dist.all_gather_object(pieces, piece)
    pieces.sort(key=lambda p: p["ks"][0])
    if _CTX.is_main:
        stacked = stack_members([m for p in pieces for m in p["members"]])
        param = next(model.parameters())
        model.load_state_dict({k: v.to(param.device) for k, v in stacked.items()})
    merged = type(state)(lr=state.lr, batch_size=state.batch_size)
    for p in pieces:
        s = p["state"]
        merged.epoch = max(merged.epoch, s.epoch)
        merged.train_seconds = max(merged.train_seconds, s.train_seconds)  # ranks train at the same time
        merged.images_seen += s.images_seen
        merged.member_best += s.member_best
        merged.member_best_epoch += s.member_best_epoch
        merged.member_wait += s.member_wait
        merged.member_stopped += s.member_stopped
        merged.history += [{**h, "rank": pieces.index(p), "members_trained": p["ks"]} for h in s.history]
    return merged


RANKS_DIR = "ranks"


def checkpoint_dir(run_dir: Path) -> Path:
    """Where this rank checkpoints: the run folder (rank 0 writes it), or its own folder when members are spread."""
    return run_dir / RANKS_DIR / str(_CTX.rank) if _CTX.members_over_ranks else run_dir
