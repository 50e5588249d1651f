"""The kind sampler (vae/kind_prior.py): a code of a flower's kind learned from pairs of photos of one kind, a
prior conditioned on it, the one strength knob of its variations, and the commands that use it."""

import json
import math
import shutil

import pytest
import torch
from conftest import make_flowers_root, real_flower_files, run_script

from vae.inference import DEFAULT_STRENGTH
from vae.kind_prior import (CODE_NOISE, KIND_STRENGTH, KindDenoiser, KindPrior, Partners, fit_kind_prior, guided,
                            nearest_neighbours, on_sphere)
from vae.samplers import Posteriors
from vae.trained import load_model
from vae_inference import main

SHAPE = (4, 4, 4)


def two_kinds_of_latents(count, seed=0, kinds=4):
    """(latents (count, 4, 4, 4), classes 1..kinds): each kind is a global offset of every channel (what photos of
    one kind share), each latent adds its own noise at every position (its layout)."""
    offsets = 2.0 * torch.randn(kinds, SHAPE[0], 1, 1, generator=torch.Generator().manual_seed(0))  # the kinds
    classes = torch.arange(count) % kinds
    latents = offsets[classes] + torch.randn(count, *SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    return latents, classes + 1


def test_partners_are_of_the_same_class_or_near_neighbours_or_the_latent_itself():
    latents, classes = two_kinds_of_latents(64)
    index = torch.arange(64).repeat(20)
    generator = torch.Generator().manual_seed(0)
    by_class = Partners(latents, classes, "neighbour")
    assert by_class.by == "classes"
    partners = by_class.draw(index, generator)
    assert torch.equal(classes[partners], classes[index]) and (partners != index).float().mean() > 0.5
    unlabelled = Partners(latents, torch.zeros(64, dtype=torch.long), "neighbour")  # classes unknown
    assert unlabelled.by == "neighbours"
    neighbours = nearest_neighbours(latents.flatten(1), 8)
    partners = unlabelled.draw(index, generator)
    assert all(partner in neighbours[i] for i, partner in zip(index.tolist(), partners.tolist()))
    assert torch.equal(Partners(latents, classes, "self").draw(index, generator), index)
    # One latent per class teaches nothing a class shares: nearest neighbours instead.
    assert Partners(latents, torch.arange(1, 65), "neighbour").by == "neighbours"


def test_class_indices_number_the_classes_from_zero_only_when_they_are_used():
    latents, classes = two_kinds_of_latents(64)
    labels = Partners(latents, 10 * classes, "self").class_indices()  # classes 10, 20, 30, 40
    assert torch.equal(labels, classes - 1)
    assert Partners(latents, torch.zeros(64, dtype=torch.long), "self").class_indices() is None  # unknown
    assert Partners(latents, None, "self").class_indices() is None


@pytest.mark.slow  # fits a kind prior twice for 150 steps
def test_a_class_read_out_adds_its_cross_entropy_and_learns_the_class_but_is_not_stored():
    """class_weight w > 0: the fit's loss is the denoising loss plus w times the cross-entropy of a linear read-out
    of the class from the code. On latents whose four classes are easy to tell, that cross-entropy falls well
    below chance (ln 4), so the loss exceeds the fit without it by less than w ln 4 / 2; the read-out is dropped
    from the stored network, which loads without it."""
    latents, classes = two_kinds_of_latents(256)
    def fit(class_weight):
        return fit_kind_prior(latents, 0.1 * torch.ones_like(latents), SHAPE, classes, pairing="self", steps=150,
                              batch_size=64, amp=False, class_weight=class_weight, code_noise=0.0)
    without, with_labels = fit(0.0), fit(1.0)
    assert without["class_weight"] == 0.0 and with_labels["class_weight"] == 1.0
    added = with_labels["loss"] - without["loss"]
    assert 0 < added < 0.5 * math.log(4), added
    assert not any(name.startswith("class_head") for name in with_labels["network"])
    KindPrior(with_labels).check(64)  # the stored network loads without its read-out


def test_nearest_neighbours_match_a_full_sort_and_leave_each_point_out():
    points = torch.randn(300, 5, generator=torch.Generator().manual_seed(1))
    found = nearest_neighbours(points, 3, chunk=64)
    distances = torch.cdist(points, points).fill_diagonal_(float("inf"))
    assert torch.equal(found, distances.argsort(dim=1)[:, :3])


def test_guidance_mixes_the_conditional_and_unconditional_predictions():
    torch.manual_seed(0)
    network = KindDenoiser(4, (4, 4), code_size=8, width=8, multipliers=(1, 2))
    for parameter in network.parameters():  # the zero-initialised layers would hide the condition
        torch.nn.init.normal_(parameter, std=0.2)
    u, t = torch.randn(3, *SHAPE), torch.rand(3)
    codes = on_sphere(torch.randn(3, 8))
    conditional, unconditional = network(u, t, codes), network(u, t)
    assert not torch.allclose(conditional, unconditional)
    assert torch.allclose(guided(network, codes, 1.0)(u, t), conditional)
    assert torch.allclose(guided(network, codes, 0.0)(u, t), unconditional)
    expected = unconditional + 2.5 * (conditional - unconditional)
    assert torch.allclose(guided(network, codes, 2.5)(u, t), expected, atol=1e-5)
    # Dropping a code (keep False) is the unconditional prediction for that row alone.
    mixed = network(u, t, codes, keep=torch.tensor([True, False, True]))
    assert torch.allclose(mixed[1], unconditional[1], atol=1e-6) and torch.allclose(mixed[0], conditional[0], atol=1e-6)


@pytest.fixture(scope="module")
def fitted():
    """A kind prior of the neighbour design, fitted briefly to latents of four kinds: its code must learn the kind
    from pairs of one class alone."""
    latents, classes = two_kinds_of_latents(256)
    state = fit_kind_prior(latents, 0.1 * torch.ones_like(latents), SHAPE, classes, pairing="neighbour", steps=300,
                           batch_size=64, amp=False, code_noise=0.0)
    return KindPrior(state), latents, classes


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_the_code_holds_the_kind_and_sampling_needs_only_plain_tensors(fitted):
    kind, latents, classes = fitted
    state = kind.state
    assert state["partners"] == "classes" and state["classes"] == [1, 2, 3, 4]
    assert all(isinstance(value, (torch.Tensor, int, float, str, list, dict)) for value in state.values())
    # Fresh latents of the four kinds: the nearest class code is their own kind's.
    fresh, fresh_classes = two_kinds_of_latents(200, seed=5)
    codes = kind.codes(fresh.flatten(1))
    assert codes.norm(dim=1).allclose(torch.full((200,), 16 ** 0.5))
    nearest = torch.cdist(codes, state["class_codes"]).argmin(dim=1) + 1
    assert (nearest == fresh_classes).float().mean() > 0.9
    # A sample of class k lies nearer to kind k's offsets than to the others'.
    offsets = torch.stack([latents[classes == k].mean((0, 2, 3)) for k in (1, 2, 3, 4)])
    drawn = kind.draw(kind.class_code(3).expand(32, -1), torch.Generator().manual_seed(0))
    channel_means = drawn.view(32, *SHAPE).mean((2, 3))
    assert (torch.cdist(channel_means, offsets).argmin(dim=1) == 2).float().mean() > 0.8
    assert kind.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 64)


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_one_strength_goes_from_the_photo_through_its_kind_to_any_flower(fitted):
    kind, latents, _ = fitted
    photos = latents[:4].flatten(1)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(kind.vary(photos, 0.0, generator()), photos)
    near, kept = kind.vary(photos, 0.05, generator()), kind.vary(photos, KIND_STRENGTH, generator())
    assert (near - photos).norm() < 0.7 * (kept - photos).norm()
    # At strength 1 the code is ignored: two different photos with the same noise give the same new flower.
    free = [kind.vary(photo[None], 1.0, generator()) for photo in photos]
    assert all(torch.allclose(free[0], other, atol=1e-5) for other in free[1:])
    kept = [kind.vary(photo[None], KIND_STRENGTH, generator()) for photo in photos]
    assert not any(torch.allclose(kept[0], other, atol=1e-3) for other in kept[1:])
    assert torch.equal(kind.vary(photos, 0.2, generator()), kind.vary(photos, 0.2, generator()))  # seeded


def test_code_noise_is_fitted_with_and_stored():
    latents, classes = two_kinds_of_latents(128)
    state = fit_kind_prior(latents, 0.1 * torch.ones_like(latents), SHAPE, classes, pairing="self", steps=20,
                           batch_size=32, amp=False, code_noise=1.0)
    assert state["code_noise"] == 1.0
    KindPrior(state).check(64)
    for damaged in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="code noise"):
            KindPrior({**state, "code_noise": damaged}).check(64)


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_variations_of_a_noisy_code_draw_it_around_the_photos_code(fitted, monkeypatch):
    """With code_noise s, vary() conditions on the photo's code plus N(0, s^2) per number, put back on the sphere
    of radius r = sqrt(K): for K = 16 and s = 1 the cosine to the photo's code is about r / sqrt(r^2 + K s^2) =
    0.71. Without it, on the photo's own code."""
    kind, latents, _ = fitted
    photos = latents[:1].flatten(1).expand(512, -1)
    seen = []
    monkeypatch.setattr(KindPrior, "draw", lambda self, codes, *args, **kwargs: seen.append(codes) or
                        torch.zeros(len(codes), 64))
    for level in (0.0, 1.0):
        noisy = KindPrior({**kind.state, "code_noise": level})
        noisy.vary(photos, 0.5, torch.Generator().manual_seed(0))
        code = kind.codes(photos[:1])
        cosines = torch.nn.functional.cosine_similarity(seen[-1], code)
        assert seen[-1].norm(dim=1).allclose(torch.full((512,), 4.0), atol=1e-4)
        if level == 0:
            assert cosines.min() > 0.9999
        else:
            assert cosines.mean().item() == pytest.approx(4 / math.sqrt(16 + 16), abs=0.03)
            assert cosines.std() > 0.03  # each variation its own draw


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_variations_can_override_the_fits_code_noise(fitted, monkeypatch):
    kind, latents, _ = fitted
    photos = latents[:1].flatten(1).expand(64, -1)
    seen = []
    monkeypatch.setattr(KindPrior, "draw", lambda self, codes, *args, **kwargs: seen.append(codes) or
                        torch.zeros(len(codes), 64))
    noisy = KindPrior({**kind.state, "code_noise": 1.0})
    noisy.vary(photos, 0.5, torch.Generator().manual_seed(0), code_noise=0.0)
    assert torch.nn.functional.cosine_similarity(seen[-1], kind.codes(photos[:1])).min() > 0.9999
    kind.vary(photos, 0.5, torch.Generator().manual_seed(0), code_noise=1.0)  # a fit without noise, drawn with it
    assert torch.nn.functional.cosine_similarity(seen[-1], kind.codes(photos[:1])).max() < 0.99


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_of_several_candidates_a_variation_is_the_one_whose_code_is_nearest_the_photos(fitted):
    kind, latents, _ = fitted
    photos = latents[:6].flatten(1)
    kept = kind.vary(photos, 0.3, torch.Generator().manual_seed(0), candidates=3)
    generator = torch.Generator().manual_seed(0)  # the same draws, one candidate at a time
    drawn = [kind.vary(photos, 0.3, generator) for _ in range(3)]
    photo_codes = kind.codes(photos)
    distances = torch.stack([(kind.codes(candidate) - photo_codes).norm(dim=1) for candidate in drawn])
    nearest = torch.stack([drawn[distances[:, row].argmin()][row] for row in range(len(photos))])
    assert torch.allclose(kept, nearest, atol=1e-5)
    assert not torch.allclose(drawn[0], drawn[1], atol=1e-3)  # the candidates differ: there was a choice


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_the_interpolation_starts_and_ends_near_the_photos(fitted):
    kind, latents, _ = fitted
    a, b = latents[:1].flatten(1), latents[1:2].flatten(1)
    path = kind.interpolate(a, b, 5)
    assert path.shape == (5, 64)
    distance = (a - b).norm()
    assert (path[0] - a).norm() < 0.25 * distance and (path[-1] - b).norm() < 0.25 * distance


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_the_walk_changes_only_the_code(fitted):
    kind, _, _ = fitted
    walk = kind.walk(kind.typical_code(), 3, 2.0, 5, torch.Generator().manual_seed(0))
    assert walk.shape == (15, 64)
    rows = walk.view(3, 5, -1)
    assert all(not torch.allclose(row[0], row[-1], atol=1e-3) for row in rows)


@pytest.mark.slow  # fits a kind prior for 300 steps
def test_the_walk_turns_the_code_along_great_circles_through_a_typical_code(fitted, monkeypatch):
    """Row r turns the start along the great circle towards principal direction r by an arc of v * spread[r]:
    every code stays on the sphere, the middle of each row is the start, and the ends lie that angle away."""
    kind, _, _ = fitted
    seen = []
    monkeypatch.setattr(KindPrior, "draw", lambda self, codes, *args, **kwargs: seen.append(codes) or
                        torch.zeros(len(codes), 64))
    start = kind.typical_code()
    radius = math.sqrt(kind.state["code_size"])
    assert start.norm().item() == pytest.approx(radius, rel=1e-5)
    kind.walk(start, 3, 2.0, 5, torch.Generator().manual_seed(0))
    codes = seen[-1].view(3, 5, -1)
    assert codes.norm(dim=2).allclose(torch.full((3, 5), radius), rtol=1e-5)
    assert codes[:, 2].allclose(start.expand(3, -1), atol=1e-5)
    for r in range(3):
        spread, direction = kind.state["code_spread"][r], kind.state["code_directions"][r]
        for end, sign in ((codes[r, -1], 1), (codes[r, 0], -1)):
            angle = torch.arccos(torch.clamp(end @ start[0] / radius ** 2, -1, 1))
            assert angle.item() == pytest.approx(min(2.0 * spread.item() / radius, math.pi), abs=1e-3)
            assert sign * ((end - start[0]) @ direction).item() > 0  # towards the direction, or away from it


# ----------------------------------------------------------------------------------------- through the CLI

@pytest.fixture(scope="module")
def with_kind(checkpoint, flowers_root, tmp_path_factory):
    """The conftest run exported with a briefly fitted kind sampler, through the CLI."""
    exported = tmp_path_factory.mktemp("kind") / "kind.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--fit-samplers", "kind", "--kind-steps", "30",
                 "--kind-code-noise", "0.5", "--data-dir", str(flowers_root), "--out", str(exported)]) == 0
    return exported


@pytest.mark.slow  # Inception v3 on the CPU, and the sweep twice in its own process
def test_the_sweeps_knobs_of_the_kind_mode_change_its_variations(with_kind, tmp_path):
    root = make_flowers_root(tmp_path / "four", classes=4)
    held_out = tmp_path / "holdout.pt"  # as if trained with a quarter of train+val held out: 10 photos to vary
    checkpoint = torch.load(with_kind, weights_only=True)
    checkpoint["config"].update(split="train+val", holdout=0.25)
    torch.save(checkpoint, held_out)

    def sweep(*knobs):
        result = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root,
                            "--modes", "kind", "--strengths", "0.2", "--variations", "2", *knobs)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])

    plain = sweep()
    as_fitted, knobbed = plain["points"][0], sweep("--kind-code-noise", "0", "--kind-candidates", "2")["points"][0]
    guided_run = sweep("--kind-guidance", "4", "--class-samples", "3")
    guided = guided_run["points"][0]
    assert as_fitted["variation_mode"] == knobbed["variation_mode"] == guided["variation_mode"] == "kind"
    # One seed: the same variations unless the knobs reach them.
    for changed in (knobbed, guided):
        assert changed["variation_rmse_to_input"] != pytest.approx(as_fitted["variation_rmse_to_input"], rel=1e-6)
    # sample --class N measured: 3 samples of each class the kind sampler was fitted on, judged by the classifier.
    by_class = guided_run["class_samples"]
    fitted_classes = load_model(held_out, "cpu").sampler("kind").state["classes"]
    assert by_class["class_samples_per_class"] == 3 and by_class["classes"] == len(fitted_classes) >= 2
    assert 0 <= by_class["class_samples_kept"] <= 1 and 0 <= by_class["species_accuracy_real"] <= 1
    assert "class_samples" not in plain  # only when asked for
    negative = run_script("benchmarks/variation_sweep.py", "--checkpoint", held_out, "--data-dir", root,
                          "--class-samples", "-1")
    assert negative.returncode == 2 and "--class-samples -1" in negative.stderr.strip().splitlines()[-1]


def test_kind_is_the_default_of_variations_and_samples(with_kind, flowers_root, tmp_path, capsys):
    photo = sorted((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))[0]
    stored = torch.load(with_kind, weights_only=True)["samplers"]["kind"]
    assert stored["kind"] == "kind" and stored["code_size"] == 16
    assert stored["steps"] == 30 and stored["code_noise"] == 0.5  # export's --kind-steps and --kind-code-noise
    config = torch.load(with_kind, weights_only=True)["config"]
    assert config["kind_prior_steps"] == 30 and config["kind_code_noise"] == 0.5  # the run's settings say so
    # An export stores the samplers' networks in float16: half the bytes, loaded into float32 networks.
    assert all(value.dtype == torch.float16 for value in stored["network"].values() if value.is_floating_point())
    network = load_model(with_kind, "cpu").sampler("kind").network("cpu")
    assert all(parameter.dtype == torch.float32 for parameter in network.parameters())
    capsys.readouterr()
    assert main(["variations", "--checkpoint", str(with_kind), "--images", str(photo), "--num", "3", "--out",
                 str(tmp_path / "v.png")]) == 0
    assert f"3 kind variations at strength {DEFAULT_STRENGTH:g}" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(with_kind), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert "kind samples" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(with_kind), "--like", str(photo), "--num", "4", "--out",
                 str(tmp_path / "like.png")]) == 0
    assert f"new flowers of the kind of {photo}" in capsys.readouterr().out
    assert (tmp_path / "like.png").stat().st_size > 0
    mine = tmp_path / "mine.jpg"
    shutil.copy(photo, mine)
    assert main(["sample", "--checkpoint", str(with_kind), "--like", str(mine), "--out", str(mine)]) == 2
    assert "is the --like file this command reads" in capsys.readouterr().err
    assert mine.read_bytes() == photo.read_bytes()


def test_sample_of_a_class_and_its_errors(with_kind, checkpoint, tmp_path, capsys):
    trained = load_model(with_kind, "cpu")
    known = trained.sampler("kind").state["classes"]
    capsys.readouterr()
    if trained.sampler("kind").state["class_codes"].shape[0]:
        assert main(["sample", "--checkpoint", str(with_kind), "--class", str(known[0]), "--num", "2", "--out",
                     str(tmp_path / "c.png")]) == 0
        assert f"new flowers of class {known[0]}" in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(with_kind), "--class", "999", "--out", str(tmp_path / "c.png")]) == 2
    assert "class 999 is not one this model trained on" in capsys.readouterr().err
    # A checkpoint without the kind sampler says how to fit one, and what works without it.
    assert main(["sample", "--checkpoint", str(checkpoint), "--class", "1", "--out", str(tmp_path / "c.png")]) == 2
    error = capsys.readouterr().err
    assert "no kind sampler" in error and "--fit-samplers kind" in error and "drop --like and --class" in error
    assert main(["traverse", "--checkpoint", str(checkpoint), "--walk", "code", "--out", str(tmp_path / "t.png")]) == 2
    assert "pass --walk latent" in capsys.readouterr().err


def test_traverse_and_interpolate_walk_the_code_by_default(with_kind, checkpoint, flowers_root, tmp_path, capsys):
    photos = sorted((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))[:2]
    capsys.readouterr()
    assert main(["traverse", "--checkpoint", str(with_kind), "--steps", "5", "--dims", "3", "--out",
                 str(tmp_path / "t.png")]) == 0
    out = capsys.readouterr().out
    assert "a row per principal direction of the code" in out and "(15 images, 5 per row)" in out
    assert main(["traverse", "--checkpoint", str(with_kind), "--walk", "latent", "--steps", "5", "--dims", "3",
                 "--out", str(tmp_path / "t.png")]) == 0
    assert "a row per latent dimension" in capsys.readouterr().out
    assert main(["interpolate", "--checkpoint", str(with_kind), "--images", *map(str, photos), "--steps", "4",
                 "--out", str(tmp_path / "i.png")]) == 0
    assert "the path between the codes of their kinds" in capsys.readouterr().out
    assert main(["interpolate", "--checkpoint", str(checkpoint), "--images", *map(str, photos), "--steps", "4",
                 "--out", str(tmp_path / "i.png")]) == 0  # no kind sampler: the posterior means, as before
    assert "linear path between the posterior means" in capsys.readouterr().out


def test_export_keeps_a_code_per_class_of_class_sub_folders(checkpoint, tmp_path):
    """Photos sorted into class folders: the fit (of the default design, the photo's own code) keeps each folder's
    mean code, for sample --class."""
    for i, source in enumerate(real_flower_files(16)):
        folder = tmp_path / "photos" / ("roses" if i % 2 else "tulips")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, folder / f"{i}.jpg")
    out = tmp_path / "kind.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--fit-samplers", "kind", "--kind-steps", "10",
                 "--data-dir", str(tmp_path / "photos"), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)["samplers"]["kind"]
    assert state["pairing"] == "self" and state["classes"] == [1, 2] and state["class_codes"].shape == (2, 16)


def test_posteriors_give_mirror_images_their_photos_classes():
    means = torch.randn(3, 4)
    posteriors = Posteriors(means, means.abs(), (4,), (means, means.abs()), torch.tensor([2, 5, 7]))
    assert posteriors.all_classes().tolist() == [2, 5, 7, 2, 5, 7]


# ------------------------------------------------------------------------------------------------ the page

def test_the_page_draws_more_like_the_photo_and_walks_the_code(with_kind, checkpoint, flowers_root):
    import vae_demo

    photo = str(sorted((flowers_root / "flowers-102" / "jpg").glob("*.jpg"))[0])
    demo = vae_demo.Demo(with_kind, torch.device("cpu"), scale=2)
    pictures, note, seed = demo.more_like(photo, 6, 1.0, 7, True)
    assert len(pictures) == 6 and note == "" and seed == 7
    again, _, _ = demo.more_like(photo, 6, 1.0, 7, True)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(pictures, again))  # a fixed seed repeats its draw
    pictures, note, _ = demo.more_like(None, 6, 1.0, 7, True)
    assert pictures == [] and "upload a photo" in note
    walk, note, _ = demo.walk(photo, 3, 0, True)
    assert len(walk) == 3 * vae_demo.WALK_STEPS and note == ""
    assert len(demo.walk(None, 2, 0, True)[0]) == 2 * vae_demo.WALK_STEPS  # around the mean code
    assert "the number of rows" in demo.walk(photo, 99, 0, True)[1]
    without = vae_demo.Demo(checkpoint, torch.device("cpu"), scale=2)
    assert "no kind sampler" in without.walk(photo, 2, 0, True)[1]


def test_the_default_strength_keeps_the_code_and_some_of_the_layout():
    """The default strength lies below KIND_STRENGTH: SDEdit under the photo's code, not a new draw."""
    assert 0 < DEFAULT_STRENGTH < KIND_STRENGTH


def test_a_training_run_fits_the_kind_sampler_with_its_own_steps_and_code_noise():
    from vae.config import TrainConfig
    from vae.samplers import fitted_after_training

    assert "kind" not in fitted_after_training(TrainConfig())  # the tutorial fits no prior
    kind = fitted_after_training(TrainConfig(diffusion_prior_steps=100))["kind"]
    assert kind == {"steps": 100, "code_noise": CODE_NOISE}  # as many steps as the diffusion prior
    config = TrainConfig(diffusion_prior_steps=100, kind_prior_steps=700, kind_code_noise=0.0)
    assert fitted_after_training(config)["kind"] == {"steps": 700, "code_noise": 0.0}
    alone = fitted_after_training(TrainConfig(kind_prior_steps=50))  # asked for by its own steps alone
    assert alone["kind"] == {"steps": 50, "code_noise": CODE_NOISE} and "diffusion" not in alone


def test_samples_sample_like_and_walks_take_the_samplers_way_of_drawing(with_kind, monkeypatch):
    """Samples and sample --like are drawn with the sampler's sample_method (DDIM unless an instance is told
    otherwise, as benchmarks/sampling_steps.py tells it); a walk is DDIM, deterministic given its noise, so that
    two walks from one seed are the same images."""
    from test_diffusion_prior import recorded_methods

    kind = load_model(with_kind, "cpu").sampler("kind")
    calls = recorded_methods(monkeypatch)
    kind.sample(3, generator=torch.Generator().manual_seed(0))
    kind.sample_method, kind.sample_steps = "ddpm", 5
    kind.sample(3, generator=torch.Generator().manual_seed(0))
    assert calls == [("ddim", None), ("ddpm", 5)]
    walk = lambda: kind.walk(kind.typical_code(), 2, 1.0, 3, torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(walk(), walk()) and calls[2:] == [("ddim", None)] * 2
    calls.clear()
    assert main(["sample", "--checkpoint", str(with_kind), "--like", str(real_flower_files(1)[0]), "--num", "2",
                 "--out", str(with_kind.parent / "like.png")]) == 0
    assert calls == [("ddim", None)]


def test_samples_take_the_mixtures_codes_as_they_are_or_with_the_code_noise_they_are_given(with_kind, monkeypatch):
    from vae.kind_prior import around

    kind = load_model(with_kind, "cpu").sampler("kind")
    given = []
    monkeypatch.setattr(kind, "sample_given", lambda codes, generator, temperature: given.append(codes))
    kind.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(given[-1], kind.sample_codes(4, torch.Generator().manual_seed(0)))  # the default: as drawn
    kind.sample_code_noise = 1.0
    kind.sample(4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    expected = around(kind.sample_codes(4, generator), 1.0, generator)
    assert torch.equal(given[-1], expected) and not torch.allclose(given[-1], given[-2], atol=0.1)
    size = kind.state["code_size"]
    assert torch.allclose(given[-1].norm(dim=1), torch.full((4,), size ** 0.5))  # back on the sphere


def test_many_draws_are_denoised_a_chunk_at_a_time_like_one_batch(with_kind, monkeypatch):
    import vae.kind_prior

    kind = load_model(with_kind, "cpu").sampler("kind")
    codes = kind.typical_code().repeat(5, 1) + torch.randn(5, kind.state["code_size"],
                                                           generator=torch.Generator().manual_seed(0))
    whole = kind.draw(codes, torch.Generator().manual_seed(1))
    monkeypatch.setattr(vae.kind_prior, "DRAW_CHUNK", 2)  # 5 draws: chunks of 2, 2 and 1, from the same noise
    assert torch.allclose(kind.draw(codes, torch.Generator().manual_seed(1)), whole, atol=1e-4)
