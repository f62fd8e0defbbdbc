"""Multi-process, multi-node data-parallel training on ``torch.distributed`` (launched by torchrun).

Each process (rank) trains the same :class:`~scalex_scale.nn.SCALEXModule` on its own disjoint part
of every epoch (``TrainingLoader.from_train_config(..., rank=ctx.rank, world_size=ctx.world_size)``), wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel` so gradients are averaged over ranks after every
backward: one optimizer step processes ``world_size * batch_size`` cells (``TrainConfig.batch_size``
is the PER-RANK batch). NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), Gloo on CPU.

The pieces, in the order a training entry point uses them::

    ctx = init_distributed(config.device)                      # reads RANK, WORLD_SIZE, LOCAL_RANK, ...
    try:
        loader = TrainingLoader.from_train_config(source, config, rank=ctx.rank, world_size=ctx.world_size)
        check_agreement(ctx, training_fingerprint(store=..., n_train=source.n_rows, ...,
                                                  batches_per_epoch=loader.batches_per_epoch))
        module = SCALEXModule(..., seed=...)                    # DDP broadcasts rank 0's weights anyway
        ddp = wrap_ddp(module, ctx, sync_dsbn=sync_dsbn)
        trainer = Trainer(module, rank_config(config, ctx), train_module=ddp,
                          reduce_epoch_loss=all_reduce_epoch_loss())
        if resume_state is not None:
            restore_trainer_state(trainer, resume_state, ctx)  # then fit() continues from it

        def on_epoch_end(record, trainer):                     # runs on every rank at the same epoch
            save_distributed_checkpoint(ctx, trainer, model_dir, model_config=..., preprocess_state=...)

        result = trainer.fit(loader, on_epoch_end=on_epoch_end)
        sync_buffers(module, ctx)                               # rank 0's running statistics everywhere
        save_distributed_checkpoint(ctx, trainer, model_dir, ..., with_trainer_state=...)
    finally:
        shutdown()

Agreement between ranks
-----------------------
- Same number of steps: the :class:`~scalex_scale.data.samplers.ShardSampler` gives every rank
  exactly ``batches_per_epoch`` batches (``drop_last=True``: ``min_r floor(rows_r / B)``), so all
  ranks run the same number of steps per epoch and the same number of epochs.
- Same early-stopping decisions: :func:`~scalex_scale.train.all_reduce_epoch_loss` (the Trainer's
  ``reduce_epoch_loss`` hook) sums the epoch loss sums and batch counts over ranks before the
  decision, so every rank sees the same epoch loss (the mean over all ranks' batches; the recorded
  ``EpochRecord.n_batches`` counts the batches of all ranks) and stops at the same epoch with the same
  best weights.
- Same weights: DDP broadcasts rank 0's parameters when wrapping; averaged gradients
  and identical Adam states keep the parameters identical. Buffers (BatchNorm / DSBN running
  statistics) are NOT broadcast before every forward (``broadcast_buffers=False``, see
  :func:`wrap_ddp`): each rank keeps its own running statistics during training (synchronized
  DSBN's are identical anyway), and :func:`sync_buffers` gives every rank rank 0's after the last
  step; checkpoints are rank 0's.
- Reparameterization noise: :func:`rank_config` gives each rank its own noise stream (rank 0 keeps
  ``config.seed``, so a one-process run equals a non-distributed one).

Failures: a rank that raises leaves the others waiting in their next collective; torchrun's agent
then stops all workers of the job. :func:`check_agreement` and :func:`run_on_rank0` raise on EVERY
rank, with a message, instead of deadlocking.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalex_scale.nn.dsbn import convert_sync_dsbn
from scalex_scale.train.config import TrainConfig
from scalex_scale.train.trainer import Trainer, TrainerState

__all__ = [
    "AgreementError",
    "DistributedContext",
    "ENV_VARS",
    "LAUNCH_HINT",
    "barrier",
    "check_agreement",
    "distributed_trainer_state",
    "init_distributed",
    "rank_config",
    "rank_seed",
    "restore_trainer_state",
    "run_on_rank0",
    "save_distributed_checkpoint",
    "shutdown",
    "state_hash",
    "sync_buffers",
    "training_fingerprint",
    "wrap_ddp",
]

T = TypeVar("T")
Backend = Literal["nccl", "gloo"]

#: Environment variables a torchrun launch sets and :func:`init_distributed` reads.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

LAUNCH_HINT = (
    "launch with torchrun, e.g. `torchrun --nproc-per-node 4 --no-python scalex-scale fit STORE "
    "MODEL_DIR --distributed` (one node), or add `--nnodes 2 --node-rank 0|1 --rdzv-backend c10d "
    "--rdzv-endpoint HOST:PORT` on every node"
)

#: TrainConfig fields that may legitimately differ between ranks (left out of the fingerprint).
_PER_RANK_FIELDS = ("device", "progress", "log_every")


class AgreementError(RuntimeError):
    """The ranks of a distributed run do not agree on their training setup."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel job.

    Attributes
    ----------
    rank
        GLOBAL rank in ``[0, world_size)``: selects this process' data (loader ``rank``).
    world_size
        Number of processes over all nodes (loader ``world_size``).
    local_rank
        Rank within this node; only picks the CUDA device (``cuda:local_rank``).
    device
        This process' training device.
    backend
        ``"nccl"`` (CUDA) or ``"gloo"`` (CPU).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes files and logs)."""
        return self.rank == 0


# ------------------------------------------------------------------------------ setup
def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(
            f"device={device!r}: in distributed mode pass 'auto', 'cpu' or 'cuda'; every process uses "
            "cuda:LOCAL_RANK (choose the GPUs of a node with CUDA_VISIBLE_DEVICES)"
        )
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device='cuda' was requested but CUDA is not available (torch {torch.__version__}); "
            "use device='cpu' (Gloo) or 'auto'"
        )
    n_gpus = torch.cuda.device_count()
    if local_rank >= n_gpus:
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but this node has only {n_gpus} visible CUDA device(s); start at "
            f"most {n_gpus} processes per node (torchrun --nproc-per-node {n_gpus})"
        )
    return torch.device("cuda", local_rank)


def init_distributed(
    device: str = "auto",
    *,
    backend: Backend | None = None,
    timeout: datetime.timedelta | None = None,
) -> DistributedContext:
    """Join the process group of a torchrun launch and pick this process' device.

    Reads the GLOBAL ``RANK`` and ``WORLD_SIZE`` (data sharding), ``LOCAL_RANK`` (the CUDA device
    only) and ``MASTER_ADDR``/``MASTER_PORT`` (rendezvous, ``env://``) that torchrun sets. When the
    default process group already exists (a second call in the same process), returns its context.

    Parameters
    ----------
    device
        ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), ``"cuda"`` or ``"cpu"``.
        ``"cuda:N"`` is refused: each process uses ``cuda:LOCAL_RANK``.
    backend
        Default: ``"nccl"`` on CUDA, ``"gloo"`` on CPU.
    timeout
        Collective timeout (torch's default when None).

    Returns
    -------
    DistributedContext

    Raises
    ------
    RuntimeError
        The launcher's environment variables are missing (with a torchrun hint), torch was built
        without ``torch.distributed`` or the backend, CUDA requested but absent, or more processes
        on a node than GPUs.
    ValueError
        Malformed environment values, ``device="cuda:N"``, or NCCL with a CPU device.
    """
    env = os.environ
    missing = [name for name in ENV_VARS if name not in env]
    if missing:
        raise RuntimeError(
            f"distributed training needs the environment variables {', '.join(ENV_VARS)} that the "
            f"launcher sets; missing: {', '.join(missing)}. {LAUNCH_HINT}"
        )
    if not dist.is_available():
        raise RuntimeError(f"this torch build ({torch.__version__}) has no torch.distributed support")
    rank, world_size, local_rank = (_env_int(env, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent launcher environment: RANK={rank}, WORLD_SIZE={world_size}, "
            f"LOCAL_RANK={local_rank}"
        )
    dev = _resolve_device(device, local_rank)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("backend='nccl' needs CUDA devices; use backend='gloo' on CPU")
    available = {"nccl": dist.is_nccl_available, "gloo": dist.is_gloo_available}
    if backend not in available:
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if not available[backend]():
        raise RuntimeError(f"torch {torch.__version__} was built without the {backend} backend")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)

    if dist.is_initialized():
        found = (dist.get_rank(), dist.get_world_size())
        if found != (rank, world_size):
            raise RuntimeError(
                f"a process group is already initialized as rank {found[0]} of {found[1]}, but the "
                f"environment says RANK={rank}, WORLD_SIZE={world_size}"
            )
        return DistributedContext(rank, world_size, local_rank, dev, str(dist.get_backend()))

    kwargs: dict[str, Any] = {}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev.type == "cuda":
        kwargs["device_id"] = dev  # binds the NCCL communicator to this GPU eagerly
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    return DistributedContext(rank, world_size, local_rank, dev, backend)


def barrier(ctx: DistributedContext) -> None:
    """Wait until every rank gets here (on CUDA, for this rank's device)."""
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def shutdown() -> None:
    """Destroy the default process group (no-op when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -------------------------------------------------------------------------- agreement
def state_hash(obj: Any) -> str:
    """SHA-256 (hex) of the canonical JSON of ``obj`` (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def training_fingerprint(
    *,
    store: str | os.PathLike[str] | None,
    n_train: int,
    preprocess_state: Mapping[str, Any] | None,
    model_config: Mapping[str, Any],
    train_config: TrainConfig | Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The JSON-able description of a training run that every rank must share.

    Parameters
    ----------
    store
        The atlas path (made absolute). Pass None when nodes mount the store at different paths
        (``n_train`` and the preprocessing hash still identify it).
    n_train
        Training rows.
    preprocess_state
        Preprocessing state (features, scaling...): only its :func:`state_hash` is kept.
    model_config
        Module hyper-parameters and model config (e.g. ``module.hparams`` plus the domain names).
    train_config
        The user's :class:`TrainConfig` (BEFORE :func:`rank_config`); ``device``, ``progress`` and
        ``log_every`` are left out as they may differ per rank.
    **extra
        More JSON-able keys, e.g. ``loader_seed=...``, ``batches_per_epoch=loader.batches_per_epoch``,
        ``sync_dsbn=...``, ``resume_iteration=...``.
    """
    fp: dict[str, Any] = {
        "store": os.path.abspath(os.fspath(store)) if store is not None else None,
        "n_train": int(n_train),
        "preprocess_state_sha256": state_hash(preprocess_state) if preprocess_state is not None else None,
        "model_config": dict(model_config),
    }
    if train_config is not None:
        cfg = train_config.to_dict() if isinstance(train_config, TrainConfig) else dict(train_config)
        fp["train_config"] = {k: v for k, v in cfg.items() if k not in _PER_RANK_FIELDS}
    fp.update(extra)
    return fp


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key in sorted(obj, key=str):
            out.update(_flatten(obj[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix or "<fingerprint>": obj}


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _disagreement(fingerprints: list[Any]) -> str | None:
    flat = [_flatten(fp) for fp in fingerprints]
    keys = sorted(set().union(*flat))
    lines = []
    absent = object()
    for key in keys:
        values = [f.get(key, absent) for f in flat]
        texts = ["<absent>" if v is absent else json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(texts)) == 1:
            continue
        groups: dict[str, list[int]] = {}
        for rank, text in enumerate(texts):
            groups.setdefault(text, []).append(rank)
        parts = []
        for ranks in groups.values():
            value = values[ranks[0]]
            shown = "<absent>" if value is absent else _short(value)
            parts.append(f"rank{'s' if len(ranks) > 1 else ''} {_ranks_str(ranks)}: {shown}")
        lines.append(f"  {key!r}: " + "; ".join(parts))
    return "\n".join(lines) if lines else None


def _ranks_str(ranks: list[int]) -> str:
    if len(ranks) <= 8:
        return ",".join(map(str, ranks))
    return ",".join(map(str, ranks[:8])) + f",... ({len(ranks)} ranks)"


def check_agreement(ctx: DistributedContext, fingerprint: Mapping[str, Any]) -> None:
    """Check that every rank trains the same thing; a collective (call it on every rank).

    All-gathers the JSON of ``fingerprint`` (e.g. :func:`training_fingerprint`) and compares.

    Raises
    ------
    AgreementError
        On EVERY rank when the fingerprints differ, naming each differing key and which ranks
        hold which value.
    TypeError
        ``fingerprint`` is not JSON-serializable.
    """
    text = json.dumps(dict(fingerprint), sort_keys=True, allow_nan=True)  # TypeError if not JSON-able
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, text)
    report = _disagreement([json.loads(t) for t in gathered])
    if report is not None:
        raise AgreementError(
            f"the {ctx.world_size} ranks of this distributed run disagree on the training setup "
            f"(seen from rank {ctx.rank}); every rank must train the same store, preprocessing, model "
            f"and configuration:\n{report}"
        )


# ------------------------------------------------------------------------------ model
def wrap_ddp(
    module: nn.Module,
    ctx: DistributedContext,
    *,
    sync_dsbn: bool = False,
    process_group: Any = None,
    **ddp_kwargs: Any,
) -> DistributedDataParallel:
    """Move ``module`` to ``ctx.device`` and wrap it in ``DistributedDataParallel``.

    ``SCALEXModule.forward`` is the training loss, so the wrapper is the Trainer's ``train_module``
    (``Trainer(module, config, train_module=ddp, ...)``; the Trainer's optimizer and checkpoints use
    the bare ``module``, which is ``ddp.module``). Wrapping broadcasts rank 0's parameters to every
    rank (its buffers too only with ``broadcast_buffers=True``; modules built with the same seed
    start with equal buffers anyway), and DDP checks that the parameter shapes agree.

    Parameters
    ----------
    module
        The module, on any device.
    ctx
        From :func:`init_distributed`.
    sync_dsbn
        Switch every DSBN layer to per-domain synchronized statistics (global mini-batch statistics;
        see :mod:`scalex_scale.nn.sync_dsbn` for the costs). The encoder's ``BatchNorm1d`` stays
        per-rank (``torch.nn.SyncBatchNorm`` is CUDA-only).
    process_group
        Group for DDP and synchronized DSBN (None: the world).
    **ddp_kwargs
        Passed to ``DistributedDataParallel`` (defaults: ``broadcast_buffers=False``,
        ``find_unused_parameters=False``; every parameter is used at every step).

    Notes
    -----
    ``broadcast_buffers=False`` saves one collective per step (rank 0's ``2 * 1024 + 2 * D * F``
    floats of running statistics, launched and waited for before every forward) and changes nothing
    that is kept: rank 0 would only receive its own buffers; the encoder BatchNorm uses batch
    statistics in training, so its running statistics matter only for the final (rank 0's) model;
    DSBN running statistics are used in training only for a domain with a single row in a rank's
    mini-batch, where each rank now uses its own running estimate (of the same cells' distribution:
    every rank's rows are a uniform sample) instead of rank 0's; with ``sync_dsbn`` they are
    identical on all ranks anyway. :func:`sync_buffers` after training makes every rank hold rank
    0's buffers. Pass ``broadcast_buffers=True`` for the DDP default.
    """
    module.to(ctx.device)
    ddp_kwargs.setdefault("broadcast_buffers", False)
    if sync_dsbn:
        convert_sync_dsbn(module, process_group)
    if ctx.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [ctx.device.index])
        ddp_kwargs.setdefault("output_device", ctx.device.index)
    return DistributedDataParallel(module, process_group=process_group, **ddp_kwargs)


def sync_buffers(module: nn.Module, ctx: DistributedContext, *, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm / DSBN running statistics) to every rank; a collective.

    Every rank updates its buffers with its own rows (:func:`wrap_ddp` does not broadcast them per
    step), so after the last step (and in the best-weights snapshot the Trainer restores) the
    encoder BatchNorm's running statistics, and the DSBN ones unless ``sync_dsbn``, differ between
    ranks. Call this after ``Trainer.fit`` so every rank holds exactly the model
    rank 0 checkpoints (parameters are identical already).
    """
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def rank_seed(seed: int, rank: int, salt: int = 0) -> int:
    """A seed for ``rank``: ``seed`` itself for rank 0 with salt 0, else a 63-bit mix of all three."""
    if rank == 0 and salt == 0:
        return int(seed)
    words = np.random.SeedSequence([int(seed), int(rank), int(salt) & (2**64 - 1)]).generate_state(2)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def rank_config(config: TrainConfig, ctx: DistributedContext) -> TrainConfig:
    """This rank's TrainConfig: ``device`` = ``ctx.device``, own noise seed, progress bar on rank 0 only.

    ``batch_size`` stays the PER-RANK batch (global batch = ``world_size * batch_size``). Build the
    loader with the user's (shared) seed, never with the per-rank one: the shard order must agree.
    """
    return dataclasses.replace(
        config,
        device=str(ctx.device),
        seed=rank_seed(config.seed, ctx.rank),
        progress=config.progress and ctx.is_main,
    )


def restore_trainer_state(trainer: Trainer, state: TrainerState, ctx: DistributedContext) -> None:
    """Load a checkpoint's trainer state (written by rank 0) into this rank's ``trainer``.

    Use it instead of ``fit(start_state=...)``, then call ``trainer.fit(loader)``: the saved noise
    generator is rank 0's, so ranks > 0 re-seed theirs (deterministically, from the saved state and
    the rank) to keep distinct noise streams.
    """
    trainer.load_state(state)
    if ctx.rank != 0:
        digest = hashlib.sha256(state.generator_state.numpy().tobytes()).digest()
        trainer.generator.manual_seed(rank_seed(int.from_bytes(digest[:8], "little") >> 1, ctx.rank))


# -------------------------------------------------------------------- rank-0 side effects
def run_on_rank0(ctx: DistributedContext, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``fn(*args, **kwargs)`` on rank 0 only, then wait for it on every rank; a collective.

    Returns ``fn``'s result on rank 0 and None elsewhere. When ``fn`` raises on rank 0 the exception
    is re-raised there and a ``RuntimeError`` naming it is raised on the other ranks (no deadlock).
    """
    result: T | None = None
    error: BaseException | None = None
    if ctx.rank == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised below after telling the other ranks
            error = exc
    status: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)  # also the barrier
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', fn)!s}: {status[0]}")
    return result


def distributed_trainer_state(trainer: Trainer, ctx: DistributedContext) -> TrainerState | None:
    """Rank 0's :meth:`Trainer.state` with the partial epoch loss sums averaged over ranks; a collective.

    Weights, optimizer and counters are identical on every rank; the epoch sums are not. Saving their
    rank mean makes a mid-epoch resume exact: each rank restarts from the mean and the end-of-epoch
    all-reduce adds ``world_size`` of them. Returns None on ranks other than 0.
    """
    sums = trainer._sums.detach().clone()  # noqa: SLF001 - the Trainer's partial epoch sums
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    if ctx.rank != 0:
        return None
    state = trainer.state()
    return dataclasses.replace(state, epoch_sums=(sums / ctx.world_size).cpu())


def save_distributed_checkpoint(
    ctx: DistributedContext,
    trainer: Trainer,
    directory: str | os.PathLike[str],
    *,
    model_config: Mapping[str, Any] | None = None,
    preprocess_state: Mapping[str, Any] | None = None,
    with_trainer_state: bool = True,
) -> Path | None:
    """Write ``trainer.module`` (and, optionally, a resumable trainer state) from rank 0; a collective.

    Call it on every rank at the same point (e.g. from ``on_epoch_end``, which fires at the same
    epoch everywhere, or after ``fit``). Returns the directory on rank 0, None elsewhere; a write
    error raises on every rank.
    """
    from scalex_scale.train.checkpoint import save_checkpoint

    state = distributed_trainer_state(trainer, ctx) if with_trainer_state else None
    return run_on_rank0(
        ctx,
        save_checkpoint,
        directory,
        trainer.module,
        model_config=model_config,
        preprocess_state=preprocess_state,
        trainer_state=state,
    )
