"""The SCALEX variational autoencoder: batch-free encoder, DSBN decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalex_scale.nn.dsbn import DSBN, Backend, Singleton


@dataclass(frozen=True)
class LossOutput:
    """Scalar training objective of one mini-batch, each term averaged over cells.

    Attributes
    ----------
    loss
        ``recon + kl_weight * kl``.
    recon
        Binary cross-entropy summed over features (equal to the reference
        ``F.binary_cross_entropy(sigmoid(logits), x) * n_features``).
    kl
        ``KL(N(mu, var) || N(0, I))`` summed over latent dimensions.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


class SCALEXModule(nn.Module):
    """SCALEX VAE: ``x -> Linear(n_hidden) -> BatchNorm1d -> ReLU -> (mu, logvar)``;
    ``z -> Linear(n_features) -> DSBN -> logits``.

    The encoder never sees the domain, so ``mu`` is a batch-free embedding; only the decoder is
    domain-specific. Outputs are logits; apply ``torch.sigmoid`` for reconstructions.

    Parameters
    ----------
    n_features
        Input width (selected features).
    n_domains
        Number of domains (batches) of the DSBN decoder.
    n_latent
        Latent dimensions (10 in SCALEX).
    n_hidden
        Hidden width of the encoder (1024 in SCALEX).
    dsbn_backend
        Kernel backend of the DSBN layer (``"auto" | "torch" | "triton"``).
    dsbn_momentum, dsbn_eps
        DSBN running-statistics momentum and variance epsilon.
    dsbn_singleton
        The DSBN layer's rule for a domain with one row in a training mini-batch (``"passthrough"``, the
        reference package's, or ``"running"``; see :class:`~scalex_scale.nn.DSBN`). Training only.
    seed
        Seed of a private CPU generator used to initialize the weights when ``generator`` is None.
    generator
        Explicit CPU ``torch.Generator`` for the weight initialization. The global RNG is never
        touched. Weights are initialized on the CPU (identical on every machine); move the module
        with ``.to(device)`` afterwards.

    Notes
    -----
    Linear layers follow PyTorch's default initialization (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``
    for weight and bias), drawn from the explicit generator in module-registration order.
    """

    def __init__(
        self,
        n_features: int,
        n_domains: int,
        *,
        n_latent: int = 10,
        n_hidden: int = 1024,
        dsbn_backend: Backend = "auto",
        dsbn_momentum: float = 0.1,
        dsbn_eps: float = 1e-5,
        dsbn_singleton: Singleton = "passthrough",
        seed: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_features", n_features),
            ("n_domains", n_domains),
            ("n_latent", n_latent),
            ("n_hidden", n_hidden),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.n_features = int(n_features)
        self.n_domains = int(n_domains)
        self.n_latent = int(n_latent)
        self.n_hidden = int(n_hidden)
        # Built without initialization (meta device), then initialized from the explicit generator.
        skip = nn.utils.skip_init
        self.encoder = nn.Sequential(
            skip(nn.Linear, self.n_features, self.n_hidden),
            skip(nn.BatchNorm1d, self.n_hidden),
            nn.ReLU(),
        )
        self.mu_head = skip(nn.Linear, self.n_hidden, self.n_latent)
        self.logvar_head = skip(nn.Linear, self.n_hidden, self.n_latent)
        self.decoder = skip(nn.Linear, self.n_latent, self.n_features)
        self.dsbn = DSBN(
            self.n_features,
            self.n_domains,
            momentum=dsbn_momentum,
            eps=dsbn_eps,
            backend=dsbn_backend,
            singleton=dsbn_singleton,
        )
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self.reset_parameters(generator)

    @staticmethod
    def state_shapes(n_features: int, n_domains: int, n_latent: int, n_hidden: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the ``state_dict`` entries of a module with these sizes (nothing is allocated).

        Checkpoint loading compares them with a weights file's header before building the module.
        """
        f, d, z, h = int(n_features), int(n_domains), int(n_latent), int(n_hidden)
        return {
            "encoder.0.weight": (h, f), "encoder.0.bias": (h,),
            "encoder.1.weight": (h,), "encoder.1.bias": (h,), "encoder.1.running_mean": (h,),
            "encoder.1.running_var": (h,), "encoder.1.num_batches_tracked": (),
            "mu_head.weight": (z, h), "mu_head.bias": (z,), "logvar_head.weight": (z, h), "logvar_head.bias": (z,),
            "decoder.weight": (f, z), "decoder.bias": (f,),
            "dsbn.weight": (d, f), "dsbn.bias": (d, f), "dsbn.running_mean": (d, f), "dsbn.running_var": (d, f),
        }  # fmt: skip

    # ------------------------------------------------------------------ setup
    @property
    def hparams(self) -> dict[str, Any]:
        """JSON-able constructor hyper-parameters (what a checkpoint needs to rebuild the module)."""
        return {
            "n_features": self.n_features,
            "n_domains": self.n_domains,
            "n_latent": self.n_latent,
            "n_hidden": self.n_hidden,
            "dsbn_momentum": self.dsbn.momentum,
            "dsbn_eps": self.dsbn.eps,
        }

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator) -> None:
        """(Re-)initialize every parameter and buffer, drawing from ``generator`` only.

        ``generator`` must live on the device of the parameters.
        """
        for linear in (self.encoder[0], self.mu_head, self.logvar_head, self.decoder):
            bound = 1.0 / math.sqrt(linear.in_features)
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        self.encoder[1].reset_parameters()
        self.dsbn.reset_parameters()

    # ------------------------------------------------------------ the model
    def inference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x`` (N, n_features) into ``(mu, logvar)``, each (N, n_latent).

        ``logvar`` is the raw variance head: the reference's ``var = exp(head)``.
        """
        h = self.encoder(x)
        return self.mu_head(h), self.logvar_head(h)

    def sample(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reparameterized draw ``z = mu + exp(logvar / 2) * noise`` in float32.

        ``noise`` (standard normal, shape of ``mu``) takes precedence; otherwise it is drawn from
        ``generator`` (on ``mu``'s device), or from the default generator when that is None too.
        """
        mu = mu.float()
        if noise is None:
            noise = torch.empty(mu.shape, device=mu.device, dtype=torch.float32).normal_(
                generator=generator
            )
        elif noise.shape != mu.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(mu.shape)}")
        return mu + torch.exp(0.5 * logvar.float()) * noise

    def generative(self, z: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """Decode ``z`` (N, n_latent) for domains ``domain`` (N,) into float32 logits (N, n_features).

        The DSBN layer always runs in float32 (its input is upcast), also under autocast.
        """
        return self.dsbn(self.decoder(z).float(), domain)

    def loss(
        self,
        x: torch.Tensor,
        domain: torch.Tensor,
        *,
        kl_weight: float = 0.5,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> LossOutput:
        """The SCALEX objective of one mini-batch, computed in float32.

        Parameters
        ----------
        x
            (N, n_features) scaled input in [0, 1]; also the BCE target.
        domain
            (N,) int64 domain codes.
        kl_weight
            Weight of the KL term (0.5 in SCALEX).
        generator, noise
            Source of the reparameterization noise; see :meth:`sample`.
        """
        mu, logvar = self.inference(x)
        z = self.sample(mu, logvar, generator=generator, noise=noise)
        logits = self.generative(z, domain)
        n_cells = x.shape[0]
        recon = (
            F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="sum") / n_cells
        )
        mu32, logvar32 = mu.float(), logvar.float()
        kl = -0.5 * torch.sum(1.0 + logvar32 - mu32.square() - logvar32.exp()) / n_cells
        return LossOutput(loss=recon + kl_weight * kl, recon=recon, kl=kl)

    def forward(
        self,
        x: torch.Tensor,
        domain: torch.Tensor,
        *,
        kl_weight: float = 0.5,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> LossOutput:
        """Same as :meth:`loss`: ``forward`` is the training objective, so wrappers that hook
        ``forward`` (``DistributedDataParallel``, ``torch.compile``) wrap the training step."""
        return self.loss(x, domain, kl_weight=kl_weight, generator=generator, noise=noise)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The cell embedding ``mu`` (N, n_latent). Call in ``eval()`` mode under ``torch.no_grad()``."""
        return self.inference(x)[0]
