"""Shapes, parameter counts, the reparameterisation and learning: the model itself."""

import math

import pytest
import torch

from vae.layers import Decoder, Encoder, ResidualBlock, SampleLatent
from vae.likelihoods import MIN_LOG_SCALE, make_likelihood
from vae.losses import ELBOLoss
from vae.vae import VAE, build_model


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
    with pytest.raises(ValueError, match="--latent-size must be at least 1"):
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


@pytest.mark.slow  # hundreds of steps
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
    # Well below what the best image-independent output (the batch's mean image) scores: it encodes the images.
    mean_image_sse = (x - x.mean(dim=0)).pow(2).flatten(1).sum(dim=1).mean().item()
    assert reconstruction.item() < 0.75 * mean_image_sse < first


def test_same_seed_same_model_and_losses():
    def run():
        torch.manual_seed(123)
        model = VAE()
        x = torch.rand(4, 3, 32, 32)
        return model(x)[0]
    assert torch.equal(run(), run())


def test_old_config_without_the_new_settings_builds_the_seed_model():
    old = {"resolution": 32, "latent_size": 10, "channels": None, "batch_norm": False, "likelihood": "gaussian",
           "sigma": 0.7071067811865476}
    model = build_model(old)
    assert model.arch == "seed" and model.latent_shape == (10,)
    assert sum(p.numel() for p in model.parameters()) == 65_831
    # The tutorial's parameter names, so checkpoints written before the resnet still load.
    assert [name for name, _ in model.decoder.named_parameters()] == [
        "project.weight", "project.bias", "upsample.0.weight", "upsample.0.bias", "upsample.2.weight",
        "upsample.2.bias", "upsample.4.weight", "upsample.4.bias"]
    spatial = build_model({**old, "arch": "resnet", "width": 8, "latent_shape": [4, 4, 4]})
    assert spatial.latent_shape == (4, 4, 4) and spatial.latent_size == 64


@pytest.mark.parametrize("resolution, latent_shape, halvings", [(32, None, 3), (32, (16, 4, 4), 3), (32, (8, 8, 8), 2),
                                                                (64, None, 4), (64, (16, 8, 8), 3)])
@pytest.mark.parametrize("likelihood", ["gaussian", "logistic"])
def test_resnet_shapes_at_32_and_64(resolution, latent_shape, halvings, likelihood):
    model = VAE(resolution, latent_size=6, arch="resnet", width=8, latent_shape=latent_shape, likelihood=likelihood)
    x = torch.rand(2, 3, resolution, resolution)
    torch.manual_seed(0)
    parameters, mean, log_var = model(x, return_parameters=True)
    torch.manual_seed(0)
    reconstruction = model(x)[0]
    expected_latent = latent_shape or (6,)
    assert model.latent_shape == expected_latent and model.latent_size == mean[0].numel()
    assert mean.shape == log_var.shape == (2, *expected_latent)
    assert reconstruction.shape == x.shape
    assert model.decode(torch.randn(3, *model.latent_shape)).shape == (3, 3, resolution, resolution)
    assert torch.equal(reconstruction, model.likelihood.mean(parameters))
    if likelihood == "logistic":
        assert model.likelihood.mean_and_log_scale(parameters)[1].shape == x.shape
    upsamplers = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Upsample)]
    assert len(upsamplers) == halvings
    pools = [m for m in model.encoder.modules() if isinstance(m, torch.nn.AvgPool2d)]
    assert len(pools) == halvings


@pytest.mark.parametrize("latent_shape, parameters", [((16, 4, 4), 2_069_926), ((8, 8, 8), 1_304_342)])
def test_resnet_parameter_count_at_width_64(latent_shape, parameters):
    model = VAE(arch="resnet", width=64, latent_shape=latent_shape, likelihood="logistic")
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_a_new_residual_block_is_the_identity():
    h = torch.randn(2, 8, 4, 4)
    assert torch.equal(ResidualBlock(8, 8)(h), h)  # so a deep stack starts as a shallow network


def test_resnet_decoder_upsamples_by_nearest_neighbour_without_transposed_convolutions():
    model = VAE(arch="resnet", width=8, latent_shape=(4, 4, 4))
    modules = list(model.decoder.modules())
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in modules)
    upsamplers = [m for m in modules if isinstance(m, torch.nn.Upsample)]
    assert upsamplers and all(m.mode == "nearest" and m.scale_factor == 2 for m in upsamplers)
    h = torch.randn(1, 2, 3, 3)
    assert torch.equal(upsamplers[0](h), h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def test_resnet_rejects_what_does_not_fit_with_the_fix():
    with pytest.raises(ValueError, match="latent-shape C 4 4"):
        VAE(arch="resnet", latent_shape=(8, 5, 5))
    with pytest.raises(ValueError, match="latent-shape C 4 4"):
        VAE(arch="resnet", latent_shape=(8, 8, 4))  # not the same factor in height and width
    with pytest.raises(ValueError, match="needs --arch resnet"):
        VAE(latent_shape=(8, 4, 4))
    with pytest.raises(ValueError, match="three positive sizes"):
        VAE(arch="resnet", latent_shape=(8, 4))
    with pytest.raises(ValueError, match="arch seed"):
        VAE(arch="resnet", batch_norm=True)


def test_gradients_reach_every_resnet_encoder_parameter_through_the_reparameterisation():
    torch.manual_seed(0)
    model = VAE(arch="resnet", width=8, latent_shape=(4, 4, 4), likelihood="logistic")
    x = torch.randint(0, 256, (4, 3, 32, 32)) / 255
    loss_fn = ELBOLoss(beta=0.0, likelihood="logistic")  # only the reconstruction: the encoder learns through z
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # the residual blocks' last convolutions start at zero; one step wakes what lies behind
        optimizer.zero_grad()
        loss_fn(x, *model(x, return_parameters=True))[3].backward()
        optimizer.step()
    for name, parameter in model.encoder.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_forward_returns_the_decoders_parameters_for_the_same_z():
    torch.manual_seed(0)
    model = VAE(arch="resnet", width=8, latent_shape=(4, 4, 4), likelihood="logistic").eval()
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(1)
    parameters, mean, _ = model(x, return_parameters=True)
    torch.manual_seed(1)  # the same noise, so the same z
    z = model.sample_latent(*model.encode(x))
    expected = model.decode_parameters(z)
    assert torch.equal(parameters, expected)
    torch.manual_seed(1)
    outputs = model(x)
    assert len(outputs) == 3 and torch.equal(outputs[0], model.decode(z))


def test_decode_parameters_belong_to_each_likelihood():
    z = torch.randn(2, 10)
    for likelihood in ("gaussian", "gaussian-learned", "bernoulli"):  # the image is all their parameters
        model = VAE(likelihood=likelihood)
        assert torch.equal(model.decode_parameters(z), model.decode(z))
    model = VAE(likelihood="logistic")  # the tutorial's architecture, too
    mean, log_scale = model.likelihood.mean_and_log_scale(model.decode_parameters(z))
    assert torch.equal(mean, model.decode(z)) and log_scale.shape == (2, 3, 32, 32)
    assert VAE(likelihood="logistic").likelihood.shared_sigma() is None
    assert VAE(sigma=0.3).likelihood.shared_sigma() == 0.3
    assert VAE(likelihood="gaussian-learned", sigma=0.2).likelihood.log_scale().item() == pytest.approx(
        math.log(0.2), abs=1e-6)


def test_log_scale_floor_is_soft():
    raw = torch.tensor([[-30.0, -10.0, 0.0]], requires_grad=True).view(1, 1, 1, 3).repeat(1, 2, 1, 1)
    raw.retain_grad()
    logistic = make_likelihood("logistic")
    image, log_scale = logistic.mean_and_log_scale(logistic(raw))
    assert image.shape == log_scale.shape == (1, 1, 1, 3)
    assert log_scale.min() >= MIN_LOG_SCALE and log_scale[0, 0, 0, 2].item() == pytest.approx(0.0, abs=1e-3)
    log_scale.sum().backward()
    assert raw.grad[0, 1, 0, 1] > 0.01  # 3 below the floor it still learns


@pytest.mark.parametrize("architecture", [dict(arch="resnet", width=8, latent_shape=(4, 4, 4)), dict(arch="seed")])
def test_decoder_output_is_float32_under_bf16_autocast(architecture):
    model = VAE(likelihood="logistic", **architecture)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parameters, mean, _ = model(torch.rand(2, 3, 32, 32), return_parameters=True)
    assert mean.dtype == torch.bfloat16  # autocast is on ...
    assert parameters.dtype == torch.float32  # ... but not for the likelihood's parameters


@pytest.mark.slow  # hundreds of steps
def test_resnet_with_the_logistic_likelihood_learns_a_small_batch():
    torch.manual_seed(0)
    model = VAE(16, arch="resnet", width=8, latent_shape=(4, 4, 4), likelihood="logistic")
    # Smooth 8-bit images (bilinear blow-ups of 4x4 noise): far more predictable than uniform noise.
    coarse = torch.rand(4, 3, 4, 4)
    x = torch.round(torch.nn.functional.interpolate(coarse, size=16, mode="bilinear") * 255) / 255
    loss_fn = ELBOLoss(1.0, "logistic")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    totals = []
    for _ in range(100):
        total = loss_fn(x, *model(x, return_parameters=True))[3]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    uniform_nats = x[0].numel() * math.log(256)  # a model that knows nothing: 8 bits a pixel
    assert totals[0] < 1.1 * uniform_nats  # the log scale starts at the width of uniform pixels, not at 1
    assert totals[-1] < 0.95 * totals[0]


def test_a_checkpoint_from_before_likelihood_modules_loads_its_learned_sigma(tmp_path):
    """Such checkpoints kept the learned log sigma as `raw_log_sigma` at the model's top level."""
    from vae.trained import load_model

    model = VAE(likelihood="gaussian-learned", sigma=0.3)
    with torch.no_grad():
        model.likelihood.raw_log_sigma.fill_(-1.5)
    weights = model.state_dict()
    weights["raw_log_sigma"] = weights.pop("likelihood.raw_log_sigma")
    path = tmp_path / "old.pt"
    torch.save({"model": weights, "model_type": "vae", "config": {"likelihood": "gaussian-learned", "sigma": 0.3}}, path)
    loaded = load_model(path, "cpu").model
    assert loaded.likelihood.raw_log_sigma.item() == -1.5
    assert loaded.likelihood.shared_sigma() == pytest.approx(model.likelihood.shared_sigma())


# ------------------------------------------------------------------------------ space-to-depth resnet

SPACE_TO_DEPTH = dict(arch="resnet", width=8, space_to_depth=True, stage_channels=[6, 8], stage_blocks=[1, 2])


@pytest.mark.parametrize("resolution, latent_shape", [(32, (4, 8, 8)), (64, (4, 16, 16)), (32, None)])
def test_space_to_depth_runs_no_convolution_at_full_resolution(resolution, latent_shape):
    stages = SPACE_TO_DEPTH if latent_shape else {**SPACE_TO_DEPTH, "stage_channels": [6, 8, 8],
                                                  "stage_blocks": [1, 1, 2]}  # dense: 16, 8 and 4 px stages
    model = VAE(resolution, latent_size=6, latent_shape=latent_shape, likelihood="logistic", **stages)
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[-1]))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    x = torch.rand(2, 3, resolution, resolution)
    parameters, mean, log_var = model(x, return_parameters=True)
    reconstruction, log_scale = model.likelihood.mean_and_log_scale(parameters)
    assert reconstruction.shape == log_scale.shape == x.shape and mean.shape == (2, *(latent_shape or (6,)))
    assert sizes and max(sizes) == resolution // 2  # every convolution reads maps of half the image's size
    for hook in hooks:
        hook.remove()


def test_pixel_shuffle_keeps_the_logistic_means_and_log_scales_apart():
    model = VAE(32, latent_shape=(4, 8, 8), likelihood="logistic", **SPACE_TO_DEPTH)
    output = model.decoder.output
    assert output.out_channels == 6 * 4  # 4 maps at 16x16 for each of the 6 maps at 32x32
    with torch.no_grad():  # constant maps: means at logit 0 (0.5), log scales at the initial bias
        output.weight.zero_()
        output.bias[:12] = 0.0
    image, log_scale = model.likelihood.mean_and_log_scale(model.decode_parameters(torch.randn(2, 4, 8, 8)))
    assert torch.allclose(image, torch.full_like(image, 0.5))
    start = MIN_LOG_SCALE + math.log1p(math.exp(-math.log(2 * math.pi) - MIN_LOG_SCALE))  # the floored initial bias
    assert torch.allclose(log_scale, torch.full_like(log_scale, start), atol=1e-5)


def test_stage_settings_that_do_not_fit_name_the_flag_and_the_count():
    with pytest.raises(ValueError, match="--stage-channels needs one positive number per stage: 2"):
        VAE(32, latent_shape=(4, 8, 8), **{**SPACE_TO_DEPTH, "stage_channels": [8, 8, 8]})
    with pytest.raises(ValueError, match="--stage-blocks needs one positive number per stage: 3"):
        VAE(32, latent_shape=(4, 8, 8), arch="resnet", stage_blocks=[1, 0, 1])
    with pytest.raises(ValueError, match="belong to --arch resnet"):
        VAE(space_to_depth=True)


def test_default_stages_keep_the_residual_models_parameter_names():
    plain = VAE(arch="resnet", width=8, latent_shape=(4, 8, 8))
    explicit = VAE(arch="resnet", width=8, latent_shape=(4, 8, 8), stage_channels=[8, 16, 16], stage_blocks=[1, 1, 1])
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert [v.shape for v in plain.state_dict().values()] == [v.shape for v in explicit.state_dict().values()]


# The retrained models' values (train+val+test: flowers32 350 epochs, flowers64 80).
@pytest.mark.parametrize("name, mean_pixel", [("flowers32", 0.49792679321641725), ("flowers64", 0.501399776989274)])
def test_the_shipped_models_load_and_reconstruct_as_they_always_did(name, mean_pixel):
    """The shipped checkpoints name their likelihood ("logistic") in their config; their reconstructions are the
    logistic's means exactly as before its parameters became opaque: the sigmoid of the decoder's first half of
    maps, in float32."""
    from pathlib import Path

    path = Path(__file__).parent.parent / "pretrained" / f"{name}.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["config"]["likelihood"] == "logistic"
    model = build_model(checkpoint["config"])
    model.load_state_dict(checkpoint["ema_model" if "ema_model" in checkpoint else "model"])
    model.eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, *model.image_resolution), generator=generator).float() / 255
    with torch.no_grad():
        mean, _ = model.encode(x)
        reconstruction = model.decode(mean)
        before = torch.sigmoid(model.decoder(mean).float().chunk(2, dim=1)[0])
    assert torch.equal(reconstruction, before)
    # The value the code before the change gave on these images (to float32's digits on any CPU).
    assert reconstruction.double().mean().item() == pytest.approx(mean_pixel, rel=1e-6)
