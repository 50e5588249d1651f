"""Drawn flowers (generated_flowers), for the notebook and smoke runs when no Flowers102 is on disk."""

import torch


def generated_flowers(count=512, resolution=32, seed=0):
    """uint8 images (count, 3, R, R) of drawn flowers: petals of one random hue around a yellow-brown centre on a
    green-brown background, each with its own number of petals, size and turn. For the notebook and smoke runs when
    no Flowers102 is on disk: the pipeline works on them, but they are no substitute for the photos."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    axis = torch.linspace(-1, 1, resolution)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    radius, angle = (x.pow(2) + y.pow(2)).sqrt(), torch.atan2(y, x)
    petals = torch.randint(4, 9, (count, 1, 1), generator=generator)
    size = 0.45 + 0.45 * rand(count, 1, 1)
    turn = rand(count, 1, 1) * 6.3
    outline = size * (0.55 + 0.45 * torch.cos(petals * (angle + turn)).abs())  # the petals' edge at each angle
    flower = (radius < outline).float()
    centre = (radius < 0.25 * size).float()
    petal_colour = rand(count, 3, 1, 1)
    background = torch.tensor([0.25, 0.4, 0.15]).view(1, 3, 1, 1) * (0.5 + rand(count, 1, 1, 1))
    image = background * (1 - flower[:, None]) + petal_colour * flower[:, None]
    image = image * (1 - centre[:, None]) + torch.tensor([0.85, 0.7, 0.1]).view(1, 3, 1, 1) * centre[:, None]
    image = image + 0.03 * torch.randn(image.shape, generator=generator)  # some texture
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)
