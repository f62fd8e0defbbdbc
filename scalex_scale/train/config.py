"""Training hyper-parameters and runtime switches, as a frozen, JSON-able dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch

from scalex_scale.data.config import LoaderConfig
from scalex_scale.kernels.validation import check_singleton
from scalex_scale.nn.dsbn import Singleton

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train a :class:`~scalex_scale.nn.SCALEXModule` (SCALEX defaults).

    Parameters
    ----------
    max_iterations
        Total optimizer steps; epochs = ``ceil(max_iterations / batches_per_epoch)``.
    batch_size
        Cells per mini-batch (per rank in data-parallel training); the loader's batch size
        (:meth:`loader_config`, :meth:`TrainingLoader.from_train_config
        <scalex_scale.data.loader.TrainingLoader.from_train_config>`).
    lr, weight_decay
        Adam learning rate and (L2, not decoupled) weight decay.
    patience
        Early stopping: stop after this many consecutive epochs without a strictly lower
        epoch-mean loss; the best weights are restored at the end of training.
    kl_weight
        Weight of the KL term of the loss.
    dsbn_singleton
        What a training mini-batch does with a domain that has one row in it (:class:`~scalex_scale.nn.DSBN`):
        ``"passthrough"`` (default, the reference package's rule: the row passes the DSBN layer unchanged) or
        ``"running"`` (normalized with the domain's running statistics; scalex-scale's rule before 2026-12-02,
        which made training on many small domains stop at epoch 2: OneK1K query kNN ARI 0.60 vs 0.96).
    device
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        Requesting CUDA without CUDA is an error, never a silent fallback.
    precision
        ``"fp32"``, or ``"bf16"``: bfloat16 autocast of the matmuls (CUDA, or a CPU with native
        bfloat16 instructions, AVX512-BF16/AMX; an error on other CPUs); the DSBN layer, the loss
        and the weights and optimizer state stay float32.
    compile
        Wrap the training forward (loss) in ``torch.compile``.
    cuda_graphs
        Capture the whole step (forward, backward, fused capturable Adam, loss accumulation) in a
        CUDA graph and replay it; CUDA only (an error on CPU). Needs a constant batch size.
    seed
        Seed of the trainer's device generator (reparameterization noise) and of the loader's
        shuffle (:meth:`loader_config`). The module's weight initialization has its own seed (its
        constructor).
    progress
        Show a tqdm bar (loss and cells/s).
    log_every
        Steps between progress-bar refreshes of the running loss; each refresh costs one
        device-to-host sync. 0 refreshes only at epoch ends.
    loader
        The training loader's other knobs (shard size and shuffle buffer, ``drop_last``, read-ahead,
        reader threads, persistence): a :class:`~scalex_scale.data.config.LoaderConfig`. Its
        ``batch_size`` and ``seed`` are NOT used: the loader takes them from this TrainConfig
        (:meth:`loader_config`), so leave them at their defaults (other values are an error).
    """

    max_iterations: int = 30000
    batch_size: int = 64
    lr: float = 2e-4
    weight_decay: float = 5e-4
    patience: int = 10
    kl_weight: float = 0.5
    dsbn_singleton: Singleton = "passthrough"
    device: str = "auto"
    precision: Precision = "fp32"
    compile: bool = False
    cuda_graphs: bool = False
    seed: int = 0
    progress: bool = True
    log_every: int = 50
    loader: LoaderConfig = LoaderConfig()

    def __post_init__(self) -> None:
        if not isinstance(self.loader, LoaderConfig):
            raise TypeError(f"loader must be a LoaderConfig, got {type(self.loader).__name__}")
        default = LoaderConfig()
        for name in ("batch_size", "seed"):
            if getattr(self.loader, name) != getattr(default, name):
                raise ValueError(
                    f"TrainConfig.loader.{name}={getattr(self.loader, name)} is not used: the loader takes {name} "
                    f"from TrainConfig.{name}; set TrainConfig({name}=...) and leave loader.{name} at its default"
                )
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch normalization), got {self.batch_size}")
        if self.lr < 0 or self.weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {self.lr} and {self.weight_decay}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        check_singleton(self.dsbn_singleton, "dsbn_singleton")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0, got {self.log_every}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def loader_config(self) -> LoaderConfig:
        """The :class:`~scalex_scale.data.config.LoaderConfig` of the training loader: :attr:`loader` with this
        config's ``batch_size`` and ``seed`` (these two always come from the TrainConfig)."""
        return dataclasses.replace(self.loader, batch_size=self.batch_size, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field (``loader`` as a nested dict)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them.

        Dicts written before ``loader`` existed load with the default :class:`LoaderConfig`.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        data = dict(data)
        if "loader" in data:
            data["loader"] = LoaderConfig.from_dict(data["loader"])
        return cls(**data)


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 matrix instructions (oneDNN's check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device(device: str) -> torch.device:
    """Turn a :attr:`TrainConfig.device` string into a ``torch.device``.

    ``"auto"`` picks CUDA only when it is available. An explicit CUDA request on a machine without
    CUDA raises ``RuntimeError``.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device={device!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}); use device='cpu' or 'auto'"
        )
    return resolved
