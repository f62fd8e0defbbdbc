"""Tests of scalex_scale.nn: the DSBN module and the SCALEX VAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalex_scale.kernels import dsbn_reference
from scalex_scale.nn import DSBN, LossOutput, SCALEXModule

N_FEATURES, N_DOMAINS, N_HIDDEN = 24, 3, 32


def _batch(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, N_FEATURES, generator=g)
    x[x < 0.4] = 0.0  # sparse-ish, values in [0, 1]
    domain = torch.arange(n) % N_DOMAINS  # every domain has >= 2 rows
    return x, domain


def _module(seed: int = 0) -> SCALEXModule:
    return SCALEXModule(N_FEATURES, N_DOMAINS, n_hidden=N_HIDDEN, seed=seed)


# ----------------------------------------------------------------------------- DSBN
def test_dsbn_init_and_shapes() -> None:
    layer = DSBN(N_FEATURES, N_DOMAINS)
    assert layer.weight.shape == layer.bias.shape == (N_DOMAINS, N_FEATURES)
    assert torch.equal(layer.weight, torch.ones(N_DOMAINS, N_FEATURES))
    assert torch.equal(layer.bias, torch.zeros(N_DOMAINS, N_FEATURES))
    assert torch.equal(layer.running_mean, torch.zeros(N_DOMAINS, N_FEATURES))
    assert torch.equal(layer.running_var, torch.ones(N_DOMAINS, N_FEATURES))
    assert {n for n, _ in layer.named_buffers()} == {"running_mean", "running_var"}
    with pytest.raises(ValueError, match="n_domains"):
        DSBN(N_FEATURES, 0)


def test_dsbn_train_matches_reference_and_updates_running_stats() -> None:
    x, domain = _batch()
    layer = DSBN(N_FEATURES, N_DOMAINS, momentum=0.2)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        layer.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    expected = dsbn_reference(
        x, domain, layer.weight.detach(), layer.bias.detach(), rm, rv, training=True, momentum=0.2
    )
    layer.train()
    out = layer(x, domain)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)
    assert not torch.equal(layer.running_mean, torch.zeros_like(rm))
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


def test_dsbn_eval_uses_running_stats_without_updating() -> None:
    x, domain = _batch()
    layer = DSBN(N_FEATURES, N_DOMAINS)
    with torch.no_grad():
        layer.running_mean.uniform_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        layer.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(4))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    layer.eval()
    out = layer(x, domain)
    expected = (x - rm[domain]) / torch.sqrt(rv[domain] + layer.eps)
    torch.testing.assert_close(out, expected)
    assert torch.equal(layer.running_mean, rm) and torch.equal(layer.running_var, rv)


def _singleton_case() -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = _batch(n=9)
    return x.requires_grad_(True), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])  # domain 2 has one row


def _trained_layer(singleton: str) -> DSBN:
    layer = DSBN(N_FEATURES, N_DOMAINS, singleton=singleton)
    with torch.no_grad():
        layer.running_mean[2] = 0.25
        layer.running_var[2] = 4.0
        layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        layer.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    return layer


def test_dsbn_singleton_passes_through_by_default() -> None:
    """The reference package's rule: a domain's lone row in a training batch leaves the layer unchanged, its
    gradient goes straight to the input, and the domain's affine and running statistics are untouched."""
    assert DSBN(N_FEATURES, N_DOMAINS).singleton == "passthrough"
    x, domain = _singleton_case()
    layer = _trained_layer("passthrough")
    running = _trained_layer("running")
    out = layer(x, domain)
    assert torch.equal(out[8], x[8])
    torch.testing.assert_close(out[:8], running(x, domain)[:8])  # the other rows as the kernel gives them
    assert torch.all(layer.running_mean[2] == 0.25) and torch.all(layer.running_var[2] == 4.0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(g)
    assert torch.equal(x.grad[8], g[8])
    assert torch.count_nonzero(layer.weight.grad[2]) == 0 and torch.count_nonzero(layer.bias.grad[2]) == 0
    assert torch.count_nonzero(layer.weight.grad[:2]) > 0
    layer.eval()  # eval: every row, the lone one too, normalized with the running statistics
    expected = (x[8] - 0.25) / torch.sqrt(torch.tensor(4.0 + layer.eps)) * layer.weight[2] + layer.bias[2]
    torch.testing.assert_close(layer(x, domain)[8], expected)


def test_dsbn_singleton_running_rule() -> None:
    x, domain = _singleton_case()
    layer = _trained_layer("running")
    out = layer(x, domain)
    xhat = (x[8] - 0.25) / torch.sqrt(torch.tensor(4.0 + layer.eps))
    torch.testing.assert_close(out[8], xhat * layer.weight[2] + layer.bias[2])
    assert torch.all(layer.running_mean[2] == 0.25) and torch.all(layer.running_var[2] == 4.0)
    out.sum().backward()
    assert torch.count_nonzero(layer.bias.grad[2]) == N_FEATURES


def test_dsbn_without_singletons_the_rules_agree_bit_for_bit() -> None:
    x, domain = _batch()
    a, b = _trained_layer("passthrough"), _trained_layer("running")
    assert torch.equal(a(x, domain), b(x, domain))
    with pytest.raises(ValueError, match="singleton"):
        DSBN(N_FEATURES, N_DOMAINS, singleton="skip")


# ------------------------------------------------------------------------------ VAE
def test_init_is_deterministic_and_leaves_global_rng_alone() -> None:
    before = torch.get_rng_state()
    a, b, c = _module(seed=7), _module(seed=7), _module(seed=8)
    assert torch.equal(before, torch.get_rng_state())
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert not torch.equal(a.encoder[0].weight, c.encoder[0].weight)
    d = SCALEXModule(
        N_FEATURES, N_DOMAINS, n_hidden=N_HIDDEN, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a.decoder.weight, d.decoder.weight)
    bound = 1.0 / N_FEATURES**0.5
    assert a.encoder[0].weight.abs().max() <= bound
    assert torch.equal(a.encoder[1].running_var, torch.ones(N_HIDDEN))


def test_shapes_and_hparams() -> None:
    module = _module()
    x, domain = _batch()
    mu, logvar = module.inference(x)
    assert mu.shape == logvar.shape == (x.shape[0], 10)
    z = module.sample(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert z.shape == mu.shape and z.dtype == torch.float32
    logits = module.generative(z, domain)
    assert logits.shape == x.shape and logits.dtype == torch.float32
    out = module.loss(x, domain, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, LossOutput)
    assert out.loss.shape == out.recon.shape == out.kl.shape == ()
    module.eval()
    with torch.no_grad():
        assert module.embed(x).shape == (x.shape[0], 10)
    assert module.hparams == {
        "n_features": N_FEATURES,
        "n_domains": N_DOMAINS,
        "n_latent": 10,
        "n_hidden": N_HIDDEN,
        "dsbn_momentum": 0.1,
        "dsbn_eps": 1e-5,
    }
    with pytest.raises(ValueError, match="n_latent"):
        SCALEXModule(N_FEATURES, N_DOMAINS, n_latent=0)
    with pytest.raises(ValueError, match="noise"):
        module.sample(mu, logvar, noise=torch.zeros(3, 10))


def test_loss_matches_reference_formula() -> None:
    module = _module()
    x, domain = _batch()
    noise = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(5))
    out = module.loss(x, domain, kl_weight=0.5, noise=noise)

    # Written out as the reference package does (the module is in train mode; every domain has
    # >= 2 rows, so calling the layers again gives the same batch-statistics outputs).
    h = module.encoder(x)
    mu, var = module.mu_head(h), torch.exp(module.logvar_head(h))
    z = mu + var.sqrt() * noise
    recon_x = torch.sigmoid(module.generative(z, domain))
    recon = F.binary_cross_entropy(recon_x, x) * N_FEATURES
    kl = (0.5 * (var + mu.square() - 1.0 - torch.log(var))).sum(dim=1).mean()
    torch.testing.assert_close(out.recon, recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, recon + 0.5 * kl, rtol=1e-5, atol=1e-5)
    out_w = module.loss(x, domain, kl_weight=1.0, noise=noise)
    torch.testing.assert_close(out_w.loss, out_w.recon + out_w.kl)


def test_loss_noise_comes_from_the_generator() -> None:
    module = _module()
    x, domain = _batch()
    a = module.loss(x, domain, generator=torch.Generator().manual_seed(1)).loss
    b = module.loss(x, domain, generator=torch.Generator().manual_seed(1)).loss
    c = module.loss(x, domain, generator=torch.Generator().manual_seed(2)).loss
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradients_reach_every_parameter() -> None:
    module = _module()
    x, domain = _batch()
    module.loss(x, domain, generator=torch.Generator().manual_seed(0)).loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_autocast_loss_is_float32_and_close() -> None:
    module = _module()
    x, domain = _batch()
    noise = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(5))
    ref = module.loss(x, domain, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.loss(x, domain, noise=noise)
    assert out.loss.dtype == out.recon.dtype == out.kl.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=0.0)
    out.loss.backward()
    assert torch.isfinite(module.decoder.weight.grad).all()


def test_embed_is_batch_independent_in_eval() -> None:
    module = _module()
    x, _ = _batch()
    module.eval()
    with torch.no_grad():
        full = module.embed(x)
        part = module.embed(x[:5])
    torch.testing.assert_close(part, full[:5])


def test_forward_is_the_loss() -> None:
    module = _module()
    x, domain = _batch()
    noise = torch.zeros(x.shape[0], 10)
    assert torch.equal(module(x, domain, noise=noise).loss, module.loss(x, domain, noise=noise).loss)
