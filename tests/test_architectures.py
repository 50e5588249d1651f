"""Architectures as registered builders: a new one is a function and its registration, and the flags, the config
checks, build_model, training and evaluation take it with no other file changed."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from datasets.preprocessing import ImageBatches
from vae.config import TrainConfig, build_parser, validate_config
from vae.errors import UserError
from vae.layers import ARCHITECTURES, register_architecture
from vae.losses import ELBOLoss
from vae.evaluation import evaluate
from vae.training import Optimization, TrainState, memory_format, train_one_epoch
from vae.vae import VAE, build_model

NAME = "mlp-test"


class MLPEncoder(nn.Module):
    def __init__(self, image_resolution, image_channels, latent_size, width):
        super().__init__()
        pixels = image_channels * math.prod(image_resolution)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), nn.ReLU(), nn.Linear(width, 2 * latent_size))

    def forward(self, x):
        return self.net(x).chunk(2, dim=1)


class MLPDecoder(nn.Module):
    def __init__(self, image_resolution, latent_size, output_channels, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_size, width), nn.ReLU(),
                                 nn.Linear(width, width * math.prod(image_resolution)),
                                 nn.Unflatten(1, (width, *image_resolution)), nn.ReLU())
        self.output_layer = nn.Conv2d(width, output_channels, kernel_size=1)

    def forward(self, z):
        return self.output_layer(self.net(z))


def mlp_architecture(image_resolution, image_channels, latent_shape, output_channels, width=64):
    if len(latent_shape) != 1:
        raise ValueError(f"the MLP has a dense latent (--latent-size), not {latent_shape}")
    if width > 256:
        raise ValueError(f"--width of the MLP must be at most 256, got {width}")
    return (MLPEncoder(image_resolution, image_channels, latent_shape[0], width),
            MLPDecoder(image_resolution, latent_shape[0], output_channels, width))


@pytest.fixture
def mlp():
    register_architecture(NAME, help="a two-layer MLP of --width units")(mlp_architecture)
    try:
        yield ARCHITECTURES[NAME]
    finally:
        del ARCHITECTURES[NAME]


def test_a_new_architecture_is_one_builder_and_its_registration(mlp, tmp_path):
    parser = build_parser(TrainConfig)
    assert f"{NAME}: a two-layer MLP of --width units" in " ".join(parser.format_help().split())
    args = parser.parse_args(["--arch", NAME, "--width", "16", "--resolution", "8", "--latent-size", "3",
                              "--likelihood", "logistic", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3"])
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    validate_config(config)
    model = build_model(config)
    assert model.arch == NAME and isinstance(model.encoder, MLPEncoder) and model.latent_shape == (3,)
    assert model.decoder.output_layer.out_channels == 6  # the logistic's two maps per channel
    assert memory_format(config, torch.device("cuda")) == torch.contiguous_format  # channels_last is the builder's

    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    batches = ImageBatches(images, 4, "cpu", shuffle=False)
    optimization = Optimization(model, config, steps_per_epoch=len(batches))
    state = TrainState()
    first = evaluate(model, batches, beta=1.0, generator=torch.Generator().manual_seed(0))
    for epoch in range(5):
        state.epoch, state.batch = epoch, 0
        losses = train_one_epoch(model, batches, ELBOLoss(1.0, model.likelihood), optimization, state, progress=False)
        assert math.isfinite(losses["Total Loss"]) and losses["grad_norm"] > 0
    last = evaluate(model, batches, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert state.step == 10 and last["loss"] < first["loss"]
    assert math.isfinite(last["bits_per_dim"])

    # Its own checks, and the options of another architecture, are refused naming the flags.
    with pytest.raises(UserError, match="--width of the MLP must be at most 256"):
        validate_config(dataclasses.replace(config, width=512))
    with pytest.raises(UserError, match="--channels and --batch-norm belong to --arch seed; --arch mlp-test takes "
                                        "--width"):
        validate_config(dataclasses.replace(config, batch_norm=True))


def test_every_architecture_option_is_a_config_field_with_the_builders_default():
    """So a config that leaves a flag alone never trips another architecture's check, and an old checkpoint without
    a setting builds with the value it was trained with."""
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for architecture in ARCHITECTURES.values():
        for option, default in architecture.options.items():
            assert option in fields and fields[option] == default, (architecture.name, option)
    assert list(TrainConfig.__dataclass_fields__["arch"].metadata["choices"]) == list(ARCHITECTURES)


def test_options_of_another_architecture_are_refused_only_when_set():
    VAE(arch="resnet", width=8, latent_shape=(4, 4, 4), channels=None, batch_norm=False)  # their defaults: unset
    VAE(width=64, space_to_depth=False)
    with pytest.raises(ValueError, match="--width, --space-to-depth, --stage-channels and --stage-blocks belong to "
                                         "--arch resnet; --arch seed takes --channels and --batch-norm"):
        VAE(width=8)
    with pytest.raises(ValueError, match="unknown arch 'mlp'; use one of seed, resnet"):
        VAE(arch="mlp")
    with pytest.raises(TypeError, match="no architecture has an option 'depth'"):
        VAE(depth=3)


def test_channels_last_is_a_property_of_the_architecture():
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert memory_format(TrainConfig(arch="resnet"), cuda) == torch.channels_last
    assert memory_format(TrainConfig(arch="seed"), cuda) == torch.contiguous_format
    assert memory_format(TrainConfig(arch="resnet"), torch.device("cpu")) == torch.contiguous_format
