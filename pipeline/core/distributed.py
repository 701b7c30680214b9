"""Several workers, one run: torch.distributed process groups, DDP, and torch's elastic launcher.

`zoo adapt --nproc N` hands itself to torch's elastic launcher (the engine behind `torchrun`),
which starts N workers that re-enter `zoo adapt` with RANK, WORLD_SIZE and LOCAL_RANK set; any
scheduler that sets those variables (torchrun, srun scripts, Kubernetes operators) does the
same. Each worker joins the process group; rank 0 alone writes the run directory and talks.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from zoo.errors import TrainingError, ZooError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    import torch
    from torch import nn


class WorkerFailed(ZooError):
    """A worker process of a distributed run died or failed; the launcher stopped the others."""


@dataclass(frozen=True)
class Launch:
    """What `zoo adapt` asks torch's elastic launcher for: the torchrun options, by their names."""

    nproc: int = 1  # workers on this machine (torchrun --nproc-per-node)
    nnodes: int = 1  # machines taking part (torchrun --nnodes)
    node_rank: int = 0  # this machine's place, 0 being the one at the rendezvous endpoint
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0, where the machines meet

    @property
    def requested(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1


class Workers(Protocol):
    """What training, evaluation and the loaders see of the processes of a run: no ranks.

    `DistContext` is the one implementation; `SINGLE` is a run of one process, where every
    method is the identity. Only the edge (cli.py and `pipeline.adapt`) knows how many there are.
    """

    @property
    def is_main(self) -> bool:
        """This process writes the run directory (checkpoints, caches) and talks."""
        ...

    @property
    def alone(self) -> bool:
        """The run is this one process: a file it caches is read by no other worker."""
        ...

    def broadcast_object(self, value: Any) -> Any: ...

    def mean(self, values: Sequence[float]) -> list[float]: ...

    def sync_module(self, module: nn.Module) -> None: ...

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def shard(self, count: int) -> range: ...

    def gather_split(self, logits: Any, labels: Any) -> tuple[Any, Any]: ...

    def shard_features(
        self, compute: Callable[[Sequence[Any]], Any], samples: Sequence[Any]
    ) -> Any: ...

    def train_loader(
        self, dataset: Any, batch_size: int, *, seed: int, **kwargs: Any
    ) -> Iterable: ...

    def check_batch_can_shrink(self) -> None: ...


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run; the default is a run of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "nccl" or "gloo"; "" when there is no process group
    sync_bn: bool = False  # trainable BatchNorm layers share batch statistics across workers

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.world_size == 1

    def to_dict(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend, "sync_bn": self.sync_bn}

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled; the workers trust each other)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        holder = [value if self.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather_object(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        import torch.distributed as dist

        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, value)
        return found

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over ranks of each value (shards are equal in size, so means of means are exact)."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def sync_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers copied into every rank's `module`."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def shard(self, count: int) -> range:
        """This rank's indices of a split being evaluated or featurised: every world_size-th item."""
        return range(self.rank, count, self.world_size)

    def per_rank_batch(self, batch_size: int) -> int:
        """--batch-size is the global batch; each worker takes an equal share of it."""
        if batch_size % self.world_size:
            raise TrainingError(
                f"--batch-size {batch_size} does not split evenly over {self.world_size} workers; "
                f"use a multiple of {self.world_size}"
            )
        return batch_size // self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel over the parameters that train (frozen ones are not synced)."""
        if not self.enabled:
            return model
        from torch import nn
        from torch.nn.parallel import DistributedDataParallel

        if self.sync_bn:
            # In place: the converted layers keep their parameters, so checkpoints do not change.
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        device_ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def gather_split(self, logits: Any, labels: Any) -> tuple[Any, Any]:
        """Each rank's evaluation of its shard -> the whole split's (logits, labels), in split order."""
        if not self.enabled:
            return logits, labels
        return gather_split(self, logits, labels)

    def shard_features(
        self, compute: Callable[[Sequence[Any]], Any], samples: Sequence[Any]
    ) -> Any:
        """compute(samples) split across ranks and put back together, in order, on every rank."""
        return shard_features(self, compute, samples)

    def train_loader(self, dataset: Any, batch_size: int, *, seed: int, **kwargs: Any) -> Iterable:
        """Shuffled batches by `seed`; under several workers each gets its shard and its share of
        the global `batch_size` (DistributedSampler, reshuffled per epoch with `set_epoch`)."""
        import torch
        from torch.utils.data import DataLoader, DistributedSampler

        if not self.enabled:
            generator = torch.Generator().manual_seed(seed)
            return DataLoader(
                dataset, batch_size=batch_size, shuffle=True, generator=generator, **kwargs
            )
        sampler = DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed
        )
        return DataLoader(
            dataset, batch_size=self.per_rank_batch(batch_size), sampler=sampler, **kwargs
        )

    def check_batch_can_shrink(self) -> None:
        """Out of memory: one process may halve its batch, several workers cannot do so in step."""
        if self.enabled:
            raise TrainingError(
                f"worker rank {self.rank} ran out of memory; lower --batch-size and resume"
            )

    def _device(self) -> str:
        return f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu"


SINGLE = DistContext()


def interleave(parts: Sequence[Any]) -> Any:
    """Undo `shard`: rank r's i-th item goes back to position r + i * len(parts) (tensors or arrays)."""
    import numpy as np
    import torch

    world = len(parts)
    filled = [p for p in parts if p is not None and len(p)]
    if not filled:
        return parts[0]
    first = filled[0]
    total = sum(len(p) for p in filled)
    if isinstance(first, np.ndarray):
        out: Any = np.empty((total, *first.shape[1:]), dtype=first.dtype)
    else:
        out = torch.empty((total, *first.shape[1:]), dtype=first.dtype)
    for rank, part in enumerate(parts):
        if part is not None and len(part):
            out[rank::world] = part
    return out


def launched_by_torch() -> bool:
    """True inside a worker started by torchrun, `zoo adapt --nproc`, or a scheduler that sets WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(*, device: str, sync_bn: bool = False) -> DistContext:
    """Join the process group the environment describes (NCCL on CUDA, gloo on CPU); SINGLE when none."""
    if not launched_by_torch():
        return SINGLE
    import torch
    import torch.distributed as dist

    from pipeline.core.device import resolve_device

    resolved = resolve_device(device)
    if sync_bn and resolved != "cuda":
        raise TrainingError(
            "--sync-bn needs CUDA workers (torch syncs BatchNorm statistics only on GPUs); "
            "drop --sync-bn on CPU"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if resolved == "cuda" else "gloo"
    if resolved == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"worker {local_rank} has no GPU of its own ({torch.cuda.device_count()} on this machine); "
                "start at most one worker per GPU (--nproc)"
            )
        torch.cuda.set_device(local_rank)  # so that "cuda" means this worker's own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        sync_bn=sync_bn,
    )


def shutdown(context: DistContext) -> None:
    """Leave the process group together (a no-op for a single process).

    Ranks that finish early (rank 0 trains the `feature` head alone) wait here for the others:
    tearing gloo down while a peer still holds the group aborts the process.
    """
    if context.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            # A peer that already died has its own error reported; this barrier's is noise.
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()


@contextmanager
def peers_watched(context: DistContext) -> Iterator[None]:
    """Turn a collective that failed because another worker vanished into one clear line."""
    try:
        yield
    except RuntimeError as exc:
        import torch.distributed as dist

        text = str(exc)
        lost = isinstance(exc, dist.DistError) or any(
            sign in text.lower() for sign in ("closed by peer", "connection reset", "broken pipe")
        )
        if not context.enabled or not lost:
            raise
        # gloo prefixes its source location and appends advice; keep the sentence in between.
        first_line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")
        first_line = first_line.split(". ")[0][:160] or type(exc).__name__
        raise WorkerFailed(
            f"worker rank {context.rank} lost contact with another worker ({first_line}); "
            "the launcher's message names the worker that failed"
        ) from exc


def launch(request: Launch, *, argv: Sequence[str], out: Path | None = None) -> None:
    """Start the workers through torch's elastic launcher and wait for them; each runs `zoo *argv`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if launched_by_torch():
        raise ZooError(
            "this zoo already runs as a worker of torchrun or a scheduler; "
            "drop --nproc/--nnodes, the launcher decides how many workers run"
        )
    if request.nnodes > 1:
        if not request.rdzv_endpoint:
            raise ZooError(
                "--nnodes above 1 needs --rdzv-endpoint HOST:PORT, an address of node 0 that every machine reaches"
            )
        if not 0 <= request.node_rank < request.nnodes:
            raise ZooError(
                f"--node-rank {request.node_rank} is outside 0..{request.nnodes - 1}; number the machines from 0"
            )
        # Static rendezvous, torchrun's default: node 0 hosts the store at the endpoint.
        backend, endpoint, configs = "static", request.rdzv_endpoint, {"rank": request.node_rank}
    else:
        # One machine: torchrun --standalone, a store on a free local port.
        backend, endpoint, configs = "c10d", "localhost:0", {}
    if "OMP_NUM_THREADS" not in os.environ:
        # Workers inherit this environment; N workers each using every core would fight.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // request.nproc))
    config = LaunchConfig(
        min_nodes=request.nnodes,
        max_nodes=request.nnodes,
        nproc_per_node=request.nproc,
        run_id=os.environ.get("ZOO_RUN_ID", "zoo-adapt"),
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=configs,
        max_restarts=0,  # a lost worker ends the run; --resume continues it from the last epoch
        monitor_interval=0.5,
    )
    # The workers re-enter this very `zoo` (the same cli.py), whatever sys.argv[0] is.
    code_dir = str(Path(__file__).resolve().parents[2])  # the checkout, where cli.py is
    bootstrap = f"import sys; sys.path.insert(0, {code_dir!r}); import cli; cli.run()"
    try:
        elastic_launch(config, sys.executable)("-c", bootstrap, *argv)
    except ChildFailedError as exc:
        raise WorkerFailed(_failure_message(exc, request, out)) from None


def _failure_message(exc: Any, request: Launch, out: Path | None) -> str:
    """One line naming the rank that failed first and how to continue."""
    rank, failure = exc.get_first_failure()  # keyed by global rank
    if failure.exitcode is not None and failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode} (its message is above)"
    resume = f"zoo adapt --out {out} --resume" if out else "zoo adapt --out RUN_DIR --resume"
    if request.nproc > 1:
        resume += f" --nproc {request.nproc}"
    return (
        f"worker rank {rank} {how}; the other workers were stopped and every complete "
        f"epoch is saved in the run directory. Continue with: {resume}"
    )


def shard_features(context: DistContext, compute: Any, samples: Sequence[Any]) -> Any:
    """compute(samples) split across ranks and put back together, in order, on every rank."""
    if not context.enabled:
        return compute(samples)
    shard = samples[context.rank :: context.world_size]
    part = compute(shard) if len(shard) else None  # more workers than samples
    return interleave(context.gather_object(part))


def gather_split(context: DistContext, logits: torch.Tensor, labels: torch.Tensor) -> Any:
    """Each rank's evaluation of its shard -> the whole split's (logits, labels), in split order."""
    parts = context.gather_object((logits, labels))
    return interleave([p[0] for p in parts]), interleave([p[1] for p in parts])
