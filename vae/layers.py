"""The VAE's building blocks: Encoder, SampleLatent and Decoder (the tutorial's architecture), ResNetEncoder and
ResNetDecoder (the residual architecture), and the architectures: one builder each, registered under its --arch name
with @register_architecture, that checks its own options and makes an encoder and a decoder. The decoders end in
maps; the likelihood (vae/likelihoods.py) turns them into the parameters of p(x|z).

Every size is derived from the image resolution, the latent shape and the channels (or width), so the same
code serves 32x32, 64x64 and other resolutions that fit; one that does not is a ValueError naming the fix.
"""

import dataclasses
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

TUTORIAL_CHANNELS = (16, 32, 64)
# Far beyond what these models are built for; larger values are typing errors.
MAX_CHANNELS = 4096
MAX_BLOCKS = 64


def default_channels(resolution: int) -> list:
    """16, 32, 64 at 32x32; one more doubling stage each time the feature map would stay at least 4x4."""
    stages = 3
    while resolution % 2 ** (stages + 1) == 0 and resolution // 2 ** (stages + 1) >= 4:
        stages += 1
    return [16 * 2**i for i in range(stages)]


def _check_resolution(image_resolution, channels):
    height, width = image_resolution
    factor = 2 ** len(channels)
    if height % factor or width % factor:
        raise ValueError(f"image resolution {height}x{width} must be divisible by {factor} "
                         f"(2 ** {len(channels)} down-sampling stages, --channels {' '.join(map(str, channels))}); "
                         f"use a --resolution that is a multiple of {factor}")
    return height // factor, width // factor


class Encoder(nn.Module):
    """x -> (mean, log_var) of the diagonal Gaussian q(z|x), each (batch, latent_size).

    Each stage is Conv2d 3x3 ("same" padding) -> [BatchNorm] -> ReLU -> MaxPool 2, halving the image.
    """

    def __init__(self, image_resolution=(32, 32), image_channels=3, latent_size=10,
                 channels=TUTORIAL_CHANNELS, batch_norm=False):
        super().__init__()
        feature_height, feature_width = _check_resolution(image_resolution, channels)
        stages = []
        in_channels = image_channels
        for out_channels in channels:
            stages += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)]
            if batch_norm:
                stages += [nn.BatchNorm2d(out_channels)]
            stages += [nn.ReLU(), nn.MaxPool2d(2)]
            in_channels = out_channels
        self.features = nn.Sequential(*stages, nn.Flatten())
        flat_size = in_channels * feature_height * feature_width
        self.mean = nn.Linear(flat_size, latent_size)
        self.log_var = nn.Linear(flat_size, latent_size)

    def forward(self, x):
        h = self.features(x)
        return self.mean(h), self.log_var(h)


class SampleLatent(nn.Module):
    """The reparameterisation trick: z = mean + exp(0.5 * log_var) * eps with eps ~ N(0, I).

    The noise is made like `mean` (same shape, device and dtype), so gradients flow to mean and log_var and
    any latent shape works.
    """

    def __init__(self, latent_size=10):  # the tutorial's signature; the noise takes its shape from `mean`
        super().__init__()

    def forward(self, mean, log_var):
        eps = torch.randn_like(mean)
        return mean + torch.exp(0.5 * log_var) * eps


class Decoder(nn.Module):
    """z -> image in [0, 1]: Linear, reshape, one ConvTranspose2d (kernel 2, stride 2) per stage, a sigmoid.

    ReLU (after optional BatchNorm) sits between the transposed convolutions. output_channels (default
    image_channels) sets the maps of the last layer and head what is applied to them (default the tutorial's
    sigmoid); its architecture builder passes the likelihood's number of maps and nn.Identity(), and the likelihood
    reads them.
    """

    def __init__(self, image_resolution=(32, 32), image_channels=3, latent_size=10,
                 channels=TUTORIAL_CHANNELS, batch_norm=False, output_channels=None, head=None):
        super().__init__()
        self.feature_height, self.feature_width = _check_resolution(image_resolution, channels)
        self.first_channels = channels[-1]
        self.project = nn.Linear(latent_size, self.first_channels * self.feature_height * self.feature_width)
        widths = list(reversed(channels)) + [output_channels or image_channels]
        layers = []
        for i, (in_channels, out_channels) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)]
            if i < len(widths) - 2:
                if batch_norm:
                    layers += [nn.BatchNorm2d(out_channels)]
                layers += [nn.ReLU()]
        self.upsample = nn.Sequential(*layers)
        self.head = nn.Sigmoid() if head is None else head

    @property
    def output_layer(self):
        """The last layer, which gives the output maps (a likelihood initialises its bias)."""
        return self.upsample[-1]

    def forward(self, z):
        h = self.project(z).view(-1, self.first_channels, self.feature_height, self.feature_width)
        return self.head(self.upsample(h))


# ------------------------------------------------------------------------------ residual architecture

DENSE_MIN_FEATURE_SIZE = 4  # a dense latent's encoder halves the image while both sides stay at least this


def dense_feature_resolution(image_resolution):
    """The feature map (h, w) a dense latent's Linear layer reads: the image halved while both sides are even
    and stay at least DENSE_MIN_FEATURE_SIZE (4x4 at 32x32 and 64x64, 6x6 at 48x48)."""
    height, width = image_resolution
    if min(height, width) < DENSE_MIN_FEATURE_SIZE:
        raise ValueError(f"images of {height}x{width} are too small for the resnet; use at least "
                         f"{DENSE_MIN_FEATURE_SIZE}x{DENSE_MIN_FEATURE_SIZE}")
    while height % 2 == 0 and width % 2 == 0 and min(height, width) // 2 >= DENSE_MIN_FEATURE_SIZE:
        height, width = height // 2, width // 2
    return height, width


def halvings_to(image_resolution, feature_resolution):
    """How many 2x down-samplings take image_resolution to feature_resolution; a ValueError names the fix."""
    (height, width), (feature_height, feature_width) = image_resolution, feature_resolution
    factor = height // feature_height if feature_height > 0 else 0
    if (factor < 1 or height % feature_height or width % feature_width or width // feature_width != factor
            or factor & (factor - 1)):
        raise ValueError(f"a {feature_height}x{feature_width} spatial latent does not fit {height}x{width} "
                         f"images: the image must be the latent's H x W times a power of two, e.g. "
                         f"--latent-shape C {height // 8} {width // 8} (8x down-sampling)")
    return factor.bit_length() - 1


def resnet_stage_channels(width, num_stages):
    """Channels of each resolution stage, finest first: width, then 2 * width at every coarser stage."""
    return [width] + [2 * width] * (num_stages - 1)


def conv3x3(in_channels, out_channels):
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


class ResidualBlock(nn.Module):
    """x + f(x), f = SiLU -> conv 3x3 -> SiLU -> conv 3x3: the pre-activation residual block of He et al. (2016,
    "Identity Mappings in Deep Residual Networks") without normalisation layers. A 1x1 convolution on the skip
    path matches the channels where they change.

    Instead of a normalisation, the last convolution starts at zero, so every block starts as the identity and
    the stack trains like a shallow network at first (SkipInit, De & Smith 2020). Why none: with bf16 autocast
    on a CPU with native bf16 (2 threads), GroupNorm took over half of a training step, and in a short probe
    on synthetic images the GroupNorm model learned more slowly. The price: Adam trained it at lr 1e-3 but
    diverged at 2e-3 (no gradient clipping).
    """

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.residual = nn.Sequential(nn.SiLU(), conv3x3(in_channels, out_channels),
                                      nn.SiLU(), conv3x3(out_channels, out_channels))
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, kernel_size=1))

    def forward(self, x):
        return self.skip(x) + self.residual(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x up-sampling, then a 3x3 convolution. Unlike a transposed convolution with kernel 2
    and stride 2, neighbouring output pixels share inputs, so there are no checkerboard or 2x2-block artefacts
    (Odena et al. 2016, "Deconvolution and Checkerboard Artifacts")."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = conv3x3(in_channels, out_channels)

    def forward(self, x):
        return self.conv(self.upsample(x))


class ResNetShape:
    """The sizes both halves of the resnet share, from the image resolution, the latent shape and the width.

    latent_shape (D,) is a dense latent read from the dense_feature_resolution map; (C, h, w) a spatial one,
    the image down-sampled to h x w. There is one stage per resolution from the image's (or, with space_to_depth,
    half of it) down to the latent's. channels: each stage's channels, finest first (default: width, then
    2 * width); blocks: each stage's number of residual blocks (default 1).
    """

    def __init__(self, image_resolution, latent_shape, width, space_to_depth=False, channels=None, blocks=None):
        if width < 1:
            raise ValueError(f"--width of the resnet must be at least 1, got {width}")
        self.latent_shape = tuple(latent_shape)
        self.spatial = len(self.latent_shape) == 3
        if self.spatial:
            self.feature_resolution = self.latent_shape[1:]
        elif len(self.latent_shape) == 1:
            self.feature_resolution = dense_feature_resolution(image_resolution)
        else:
            raise ValueError(f"latent shape must be (size,) or (C, H, W), got {self.latent_shape}")
        self.space_to_depth = SPACE_TO_DEPTH if space_to_depth else 1
        num_stages = halvings_to(image_resolution, self.feature_resolution) + 1
        if space_to_depth and num_stages < 2:
            raise ValueError("--space-to-depth halves the image before the first stage, but this latent has the "
                             "image's resolution; use a coarser --latent-shape")
        num_stages -= int(space_to_depth)  # the stem does the first halving
        self.channels = list(channels) if channels else resnet_stage_channels(width, num_stages)
        self.blocks = list(blocks) if blocks else [1] * num_stages
        for name, values in (("--stage-channels", self.channels), ("--stage-blocks", self.blocks)):
            if len(values) != num_stages or min(values) < 1:
                raise ValueError(f"{name} needs one positive number per stage: {num_stages} for "
                                 f"{image_resolution[0]}x{image_resolution[1]} images and a "
                                 f"{self.feature_resolution[0]}x{self.feature_resolution[1]} latent"
                                 f"{' after the space-to-depth stem' if space_to_depth else ''}, got {values}")
        self.flat_features = self.channels[-1] * math.prod(self.feature_resolution)


SPACE_TO_DEPTH = 2  # the stem's pixel_unshuffle factor: each 2x2 block of pixels becomes 4 x C channels


class ResNetEncoder(nn.Module):
    """x -> (mean, log_var) of q(z|x), each (batch, *latent_shape).

    A 3x3 stem, then one stage per resolution (its residual blocks; 2x average pooling between stages). A spatial
    latent (C, h, w) comes from a 3x3 convolution to 2C channels at h x w, a dense latent (D,) from a Linear
    layer reading the coarsest (about 4x4) feature map.

    space_to_depth=True starts with pixel_unshuffle: each 2x2 block of pixels becomes one position of 4C channels,
    so that no convolution runs at the image's full resolution, where most of a step's FLOPs were spent (the
    shortcut of DC-AE, Chen et al. 2024).
    """

    def __init__(self, image_resolution=(32, 32), image_channels=3, latent_shape=(16, 4, 4), width=64,
                 space_to_depth=False, stage_channels=None, stage_blocks=None):
        super().__init__()
        shape = ResNetShape(image_resolution, latent_shape, width, space_to_depth, stage_channels, stage_blocks)
        self.latent_shape = shape.latent_shape
        self.space_to_depth = shape.space_to_depth
        layers = [conv3x3(image_channels * self.space_to_depth ** 2, shape.channels[0])]
        in_channels = shape.channels[0]
        for stage, (out_channels, blocks) in enumerate(zip(shape.channels, shape.blocks)):
            if stage > 0:
                layers.append(nn.AvgPool2d(2))
            for _ in range(blocks):
                layers.append(ResidualBlock(in_channels, out_channels))
                in_channels = out_channels
        layers.append(nn.SiLU())
        self.features = nn.Sequential(*layers)
        if shape.spatial:
            self.head = conv3x3(shape.channels[-1], 2 * self.latent_shape[0])
        else:
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(shape.flat_features, 2 * self.latent_shape[0]))

    def forward(self, x):
        if self.space_to_depth > 1:
            x = F.pixel_unshuffle(x, self.space_to_depth)
        # Mean and log-variance are the two halves of the head's channels (spatial) or units (dense).
        mean, log_var = self.head(self.features(x)).chunk(2, dim=1)
        return mean, log_var


class ResNetDecoder(nn.Module):
    """z (batch, *latent_shape) -> image (batch, image_channels, H, W) in [0, 1], or output_channels maps passed
    through head (as for Decoder).

    The mirror of ResNetEncoder: a 3x3 convolution (spatial) or a Linear layer (dense) to the coarsest features,
    one stage per resolution (its residual blocks, the last of them to the next stage's channels, then Upsample),
    SiLU, and a 3x3 convolution to the output maps, computed in float32 under autocast: a likelihood as sharp as a
    pixel bin needs more than bf16's 8 bits of mantissa. With space_to_depth the output convolution gives 4 maps
    per output map at half the resolution, and pixel_shuffle puts them in place: map k of the output is made of
    maps 4k..4k+3, so a likelihood's map groups (the logistic's means, then its log scales) stay in order.
    """

    def __init__(self, image_resolution=(32, 32), image_channels=3, latent_shape=(16, 4, 4), width=64,
                 output_channels=None, head=None, space_to_depth=False, stage_channels=None, stage_blocks=None):
        super().__init__()
        shape = ResNetShape(image_resolution, latent_shape, width, space_to_depth, stage_channels, stage_blocks)
        self.space_to_depth = shape.space_to_depth
        channels = list(reversed(shape.channels))  # coarsest first
        blocks = list(reversed(shape.blocks))
        if shape.spatial:
            self.project = conv3x3(shape.latent_shape[0], channels[0])
        else:
            self.project = nn.Sequential(nn.Linear(shape.latent_shape[0], shape.flat_features),
                                         nn.Unflatten(1, (channels[0], *shape.feature_resolution)))
        layers = []
        for stage, stage_channels in enumerate(channels):
            # Channels shrink at the coarser side of each Upsample, mirroring the encoder: the costly
            # fine-resolution convolutions then run at the fewest channels.
            out_channels = channels[min(stage + 1, len(channels) - 1)]
            for block in range(blocks[stage]):
                last = block == blocks[stage] - 1
                layers.append(ResidualBlock(stage_channels, out_channels if last else stage_channels))
            if stage + 1 < len(channels):
                layers.append(Upsample(out_channels, out_channels))
        layers.append(nn.SiLU())
        self.features = nn.Sequential(*layers)
        self.output = conv3x3(channels[-1], (output_channels or image_channels) * self.space_to_depth ** 2)
        self.head = nn.Sigmoid() if head is None else head

    @property
    def output_layer(self):
        return self.output

    def forward(self, z):
        h = self.features(self.project(z))
        with torch.autocast(h.device.type, enabled=False):
            maps = self.output(h.float())
            if self.space_to_depth > 1:
                maps = F.pixel_shuffle(maps, self.space_to_depth)
            return self.head(maps)


# ------------------------------------------------------------------------------ the architectures

ARCHITECTURES = {}  # --arch name -> Architecture


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An encoder/decoder pair, made by `build(image_resolution, image_channels, latent_shape, output_channels,
    **options) -> (encoder, decoder)`.

    The builder gets the image's (H, W) and channels, the shape of one image's z ((D,) dense or (C, H, W) spatial)
    and the number of maps the likelihood reads; it checks its own options and what it cannot build (a ValueError
    naming the flag to change). encoder(x) gives (mean, log_var), each (batch, *latent_shape); decoder(z) gives the
    maps (batch, output_channels, H, W) and has `output_layer`, the layer whose bias the likelihood initialises.
    options are the builder's keyword arguments: each is the TrainConfig field (and flag) of the same name, and its
    default is the value a checkpoint saved before that setting existed was trained with.
    """
    name: str
    build: Callable
    help: str
    channels_last: bool = False  # whether its convolutions run faster on channels_last inputs (CUDA, bf16)

    @property
    def options(self):
        """{option name: default} of the builder's keyword arguments."""
        return {name: parameter.default for name, parameter in inspect.signature(self.build).parameters.items()
                if parameter.default is not inspect.Parameter.empty}


def register_architecture(name, help, channels_last=False):
    """Function decorator: make a builder (see Architecture) available as --arch name."""
    def register(build):
        ARCHITECTURES[name] = Architecture(name, build, help, channels_last)
        return build
    return register


def architecture(name):
    """The Architecture registered as --arch name."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown arch {name!r}; use one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def _flags(names):
    flags = ["--" + name.replace("_", "-") for name in names]
    return flags[0] if len(flags) == 1 else ", ".join(flags[:-1]) + " and " + flags[-1]


def architecture_options(name, options):
    """The options of --arch name among `options`. An option only other architectures read must be at its default
    there (the value every config holds when the flag is not given); otherwise a ValueError names the flags that
    belong to the other architecture."""
    own = architecture(name).options
    for option, value in options.items():
        if option in own:
            continue
        owners = [other for other in ARCHITECTURES.values() if option in other.options]
        if not owners:
            raise TypeError(f"no architecture has an option {option!r}")
        if all(value != owner.options[option] for owner in owners):
            theirs = [other for other in owners[0].options if other not in own]
            raise ValueError(f"{_flags(theirs)} belong to --arch {owners[0].name}; --arch {name} takes "
                             f"{_flags(own) if own else 'none of them'}")
    return {option: value for option, value in options.items() if option in own}


@register_architecture("seed", help="the tutorial's conv stack")
def seed_architecture(image_resolution, image_channels, latent_shape, output_channels, channels=None,
                      batch_norm=False):
    """Encoder and Decoder, one down-sampling stage per entry of channels (default: default_channels)."""
    if len(latent_shape) != 1:
        raise ValueError(f"a spatial latent shape {latent_shape} needs --arch resnet; the tutorial's "
                         f"architecture has a dense latent (--latent-size)")
    channels = list(channels) if channels else default_channels(min(image_resolution))
    if min(channels) < 1:
        raise ValueError(f"--channels must be positive, got {channels}")
    if max(channels) > MAX_CHANNELS:
        raise ValueError(f"--channels must be at most {MAX_CHANNELS}")
    (latent_size,) = latent_shape
    return (Encoder(image_resolution, image_channels, latent_size, channels, batch_norm),
            Decoder(image_resolution, image_channels, latent_size, channels, batch_norm,
                    output_channels=output_channels, head=nn.Identity()))


@register_architecture("resnet", help="residual blocks of --width channels", channels_last=True)
def resnet_architecture(image_resolution, image_channels, latent_shape, output_channels, width=64,
                        space_to_depth=False, stage_channels=None, stage_blocks=None):
    """ResNetEncoder and ResNetDecoder (see ResNetShape for the options)."""
    # Checked before any layer is made: thousands of stages would take long even on the meta device.
    if width > MAX_CHANNELS or max(stage_channels or [0]) > MAX_CHANNELS:
        raise ValueError(f"--width and --stage-channels must be at most {MAX_CHANNELS}")
    if max(stage_blocks or [0]) > MAX_BLOCKS:
        raise ValueError(f"--stage-blocks must be at most {MAX_BLOCKS} per stage")
    stages = dict(space_to_depth=space_to_depth, stage_channels=stage_channels, stage_blocks=stage_blocks)
    return (ResNetEncoder(image_resolution, image_channels, latent_shape, width, **stages),
            ResNetDecoder(image_resolution, image_channels, latent_shape, width, output_channels=output_channels,
                          head=nn.Identity(), **stages))
