"""The metrics against closed forms, slow references and pytorch-fid: Frechet distance, KID, precision/recall and the
discretised Gaussian behind bits per dimension."""
import math

import numpy as np
import pytest
import torch

from common.metrics import (bits_per_dim, discretized_gaussian_bits_per_dim, discretized_gaussian_log_probs,
                            feature_statistics, fid_from_features, fit_log_scales, frechet_distance, kid,
                            precision_recall)

pytestmark = pytest.mark.usefixtures('single_thread')


def random_rotation(dim, seed):
    """An orthogonal matrix [dim, dim]."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def random_covariance(dim, seed):
    """A well-conditioned symmetric positive definite matrix [dim, dim]."""
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# -----------------------------------------------------------------------------
# Frechet distance

def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_commuting_closed_form():
    """Covariances sharing eigenvectors: the distance is that of the diagonal case in the rotated basis."""
    q = random_rotation(5, seed=1)
    a, b = np.array([0.2, 1.0, 2.0, 3.5, 0.7]), np.array([1.5, 0.3, 2.0, 0.1, 4.0])
    mu1, mu2 = np.zeros(5), np.full(5, 0.5)
    expected = 5 * 0.25 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-9)


def test_frechet_non_commuting_2x2_closed_form():
    """For 2x2 matrices tr (S1 S2)^(1/2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))), commuting or not."""
    s1, s2 = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
    product = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance([1.0, 0.0], s1, [0.0, 0.0], s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_zero_for_identical_statistics():
    sigma = random_covariance(32, seed=2)
    mu = np.random.default_rng(3).normal(size=32)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(torch.tensor(mu), torch.tensor(sigma), mu, sigma) == pytest.approx(0, abs=1e-9)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # pytorch-fid passes scipy's deprecated `disp`
def test_frechet_matches_pytorch_fid():
    fid_score = pytest.importorskip('pytorch_fid.fid_score')
    s1, s2 = random_covariance(16, seed=4), random_covariance(16, seed=5)
    mu1, mu2 = np.random.default_rng(6).normal(size=(2, 16))
    reference = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_fid_of_large_samples_approaches_the_gaussians_distance():
    q = random_rotation(4, seed=7)
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 2.5, 1.0, 1.0])
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -0.5, 0.0])
    rng = np.random.default_rng(8)
    x, y = rng.multivariate_normal(mu1, s1, 40000), rng.multivariate_normal(mu2, s2, 40000)
    assert fid_from_features(x, y) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.05)
    mean, covariance = feature_statistics(x)
    assert np.allclose(covariance.numpy(), np.cov(x, rowvar=False))


# -----------------------------------------------------------------------------
# KID

def slow_mmd2(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel, pair by pair."""
    d, n = x.shape[1], len(x)
    k = lambda u, v: (u @ v / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


def test_kid_matches_pairwise_reference():
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.0, size=(12, 5))
    mean, std = kid(x, y, num_subsets=3, subset_size=100)  # every subset is the whole of both sets
    assert mean == pytest.approx(slow_mmd2(x, y), rel=1e-9)
    assert std == pytest.approx(0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    shifted = rng.normal(0.5, 1.0, size=(1000, 16))
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=500)
    shifted_mean, shifted_std = kid(a, shifted, num_subsets=20, subset_size=500)
    assert abs(same_mean) < 0.02
    assert shifted_mean > 0.1 and shifted_mean > 10 * shifted_std
    assert kid(a, b, num_subsets=5, seed=1) == kid(a, b, num_subsets=5, seed=1)  # seeded


def test_kid_clips_the_subset_to_the_smaller_set():
    rng = np.random.default_rng(11)
    mean, _ = kid(rng.normal(size=(30, 4)), rng.normal(size=(500, 4)), num_subsets=4, subset_size=1000)
    assert math.isfinite(mean)
    with pytest.raises(ValueError, match='at least 2'):
        kid(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))


# -----------------------------------------------------------------------------
# Precision and recall

def slow_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 with full distance matrices."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    cross = np.linalg.norm(real[:, None] - fake[None], axis=2)  # [N, M]
    precision = np.mean((cross <= radii(real)[:, None]).any(0))
    recall = np.mean((cross <= radii(fake)[None, :]).any(1))
    return precision, recall


def test_precision_recall_matches_full_matrix_reference_when_batched():
    rng = np.random.default_rng(12)
    real, fake = rng.normal(size=(53, 6)), rng.normal(0.4, 1.2, size=(41, 6))
    expected = slow_precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected)
    assert precision_recall(real, fake, k=3, batch_size=1000) == pytest.approx(expected)


def test_precision_recall_one_for_identical_sets_and_falling_with_a_shift():
    rng = np.random.default_rng(13)
    real = rng.normal(size=(800, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    near = precision_recall(real, real + 1.0)  # a shift of 2.8 in 8 dimensions, about one k-NN radius
    far = precision_recall(real, real + 3.0)
    assert max(near) < 0.8
    assert far[0] < near[0] and far[1] < near[1] and max(far) < 0.05


def test_precision_recall_needs_k_plus_one_points():
    with pytest.raises(ValueError, match='at least 4'):
        precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)


# -----------------------------------------------------------------------------
# Bits per dimension

PIXELS = torch.arange(256, dtype=torch.float64) * 2 / 255 - 1  # every 8-bit value in [-1, 1]


@pytest.mark.parametrize('mean', [0.3, -1.0, 0.999, 3.0, -5.0])
@pytest.mark.parametrize('log_scale', [math.log(1e-4), math.log(0.01), math.log(0.3), math.log(20.0)])
def test_discretized_gaussian_sums_to_one_over_the_256_values(mean, log_scale):
    log_probs = discretized_gaussian_log_probs(PIXELS, torch.full((256,), mean), torch.tensor(log_scale))
    assert torch.isfinite(log_probs).all()
    assert float(log_probs.exp().sum()) == pytest.approx(1, abs=1e-9)


def test_tail_log_probs_are_finite_and_tiny():
    log_probs = discretized_gaussian_log_probs(torch.tensor([0.5, 1.0]), torch.tensor([-1.0, -1.0]),
                                               torch.tensor(math.log(1e-3)))
    assert torch.isfinite(log_probs).all() and (log_probs < -1e4).all()


def test_perfect_reconstruction_with_a_small_scale_costs_almost_nothing():
    x = torch.randint(0, 256, (2, 3, 8, 8)).double() * 2 / 255 - 1
    bits = discretized_gaussian_bits_per_dim(x, x, torch.full((3,), math.log(1e-3)))
    assert bits.shape == (2,) and float(bits.max()) < 1e-3  # the bin holds +-3.9 sd


def test_fitted_scale_gives_reasonable_bits_per_dim():
    generator = torch.Generator().manual_seed(14)
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=generator).double() * 2 / 255 - 1
    recon = x + 0.05 * torch.randn(x.shape, generator=generator, dtype=torch.float64)
    log_scales = fit_log_scales(x, recon)
    assert log_scales.shape == (3,)
    assert torch.allclose(log_scales.exp(), torch.full((3,), 0.05, dtype=torch.float64), rtol=0.1)
    bits = discretized_gaussian_bits_per_dim(x, recon, log_scales).mean()
    # A Gaussian of sd 0.05 on bins of width 2/255 costs about log2(0.05 sqrt(2 pi e) * 255 / 2) = 4.7 bits.
    assert 4.4 < float(bits) < 5.0
    # Uniform noise around a blank reconstruction is the worst case: about 8 bits (plus the Gaussian's misfit).
    blank = torch.zeros_like(x)
    assert float(discretized_gaussian_bits_per_dim(x, blank, fit_log_scales(x, blank)).mean()) < 8.5


def test_bits_per_dim_adds_latent_and_decoder_parts():
    parts = bits_per_dim(torch.tensor([100.0, 300.0]), torch.tensor([2.0, 4.0]), num_dims=3 * 32 * 32)
    assert parts['latent_bits_per_dim'] == pytest.approx(200 / math.log(2) / 3072)
    assert parts['decoder_bits_per_dim'] == pytest.approx(3.0)
    assert parts['bits_per_dim'] == pytest.approx(parts['latent_bits_per_dim'] + 3.0)
