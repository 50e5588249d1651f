"""Shapes, parameter counts, the reparameterisation and learning: the model itself."""

import pytest
import torch

from vae.layers import Decoder, Encoder, SampleLatent
from vae.losses import ELBOLoss
from vae.vae import VAE


def test_default_model_is_the_seeds_parameter_for_parameter():
    model = VAE()
    assert sum(p.numel() for p in model.parameters()) == 65_831
    convs = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64]
    assert model.encoder.mean.in_features == 64 * 4 * 4


@pytest.mark.parametrize("resolution, latent_size, stages", [(32, 10, 3), (32, 3, 3), (64, 10, 4), (64, 32, 4),
                                                             (48, 7, 3)])
def test_shapes_follow_resolution_and_latent_size(resolution, latent_size, stages):
    model = VAE((resolution, resolution), latent_size=latent_size)
    x = torch.rand(5, 3, resolution, resolution)
    reconstruction, mean, log_var = model(x)
    assert reconstruction.shape == x.shape
    assert mean.shape == log_var.shape == (5, latent_size)
    assert len([m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]) == stages
    assert 0 <= reconstruction.min() and reconstruction.max() <= 1


def test_non_square_images_and_explicit_channels():
    encoder = Encoder((32, 64), image_channels=1, latent_size=6, channels=(8, 16))
    decoder = Decoder((32, 64), image_channels=1, latent_size=6, channels=(8, 16))
    mean, log_var = encoder(torch.rand(2, 1, 32, 64))
    assert decoder(SampleLatent(6)(mean, log_var)).shape == (2, 1, 32, 64)


def test_resolution_that_does_not_divide_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="divisible by 8"):
        VAE((36, 36))
    with pytest.raises(ValueError, match="latent size"):
        VAE(latent_size=0)


def test_batch_norm_switch_adds_norms_and_uses_running_stats_in_eval():
    model = VAE(batch_norm=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 3 + 2  # after each encoder conv, between the decoder's transposed convs
    model.train()
    model(torch.rand(8, 3, 32, 32))
    assert all(n.num_batches_tracked.item() == 1 for n in norms)
    model.eval()
    with torch.no_grad():
        model(torch.rand(8, 3, 32, 32))
    assert all(n.num_batches_tracked.item() == 1 for n in norms)


def test_sample_latent_follows_its_inputs_device_and_dtype_and_statistics():
    mean = torch.full((20000, 2), 3.0, dtype=torch.float64)
    log_var = torch.log(torch.full((20000, 2), 4.0, dtype=torch.float64))
    z = SampleLatent(2)(mean, log_var)
    assert z.dtype == torch.float64 and z.device == mean.device
    assert torch.allclose(z.mean(0), torch.full((2,), 3.0, dtype=torch.float64), atol=0.05)
    assert torch.allclose(z.std(0), torch.full((2,), 2.0, dtype=torch.float64), atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sample_latent_on_cuda():
    mean = torch.zeros(4, 3, device="cuda")
    assert SampleLatent(3)(mean, mean).device.type == "cuda"


def test_gradients_reach_the_encoder_through_the_reparameterisation():
    torch.manual_seed(0)
    model = VAE()
    x = torch.rand(4, 3, 32, 32)
    _, _, _, total = ELBOLoss(0.1)(x, *model(x))
    total.backward()
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # The reconstruction term alone reaches log_var only through z = mean + sigma * eps.
    mean, log_var = torch.zeros(3, 5, requires_grad=True), torch.zeros(3, 5, requires_grad=True)
    SampleLatent(5)(mean, log_var).pow(2).sum().backward()
    assert log_var.grad.abs().sum() > 0 and mean.grad.abs().sum() > 0


def test_model_overfits_one_small_batch():
    torch.manual_seed(0)
    model = VAE(latent_size=16)
    x = torch.rand(8, 3, 32, 32)
    loss_fn = ELBOLoss(0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        _, _, reconstruction, total = loss_fn(x, *model(x))
        first = first if first is not None else reconstruction.item()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert reconstruction.item() < 0.5 * first


def test_same_seed_same_model_and_losses():
    def run():
        torch.manual_seed(123)
        model = VAE()
        x = torch.rand(4, 3, 32, 32)
        return model(x)[0]
    assert torch.equal(run(), run())


def test_gradient_norm_matches_the_norm_of_all_gradients_and_leaves_them_alone():
    from vae.training import gradient_norm

    model = VAE()
    x = torch.rand(4, 3, 32, 32)
    ELBOLoss(0.1)(x, *model(x))[3].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.cat([g.flatten() for g in grads]).norm()
    assert gradient_norm(model.parameters()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
