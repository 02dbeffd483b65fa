"""Sample-quality and likelihood metrics as pure functions of feature matrices or images, computed in float64
(the k-NN distances of precision/recall in float32).

Feature matrices are [N, D] (torch or numpy). FID (Heusel et al. 2017), KID (Binkowski et al. 2018), precision and
recall on k-NN manifolds (Kynkaanniemi et al. 2019), and the bits per dimension of a VQ model with a discretised
Gaussian decoder.
"""

import math

import numpy as np
import torch

PIXEL_LEVELS = 256
BIN_HALF_WIDTH = 1 / (PIXEL_LEVELS - 1)  # pixels sit at 2 * i / 255 - 1 in [-1, 1], so each bin is 2/255 wide


def _float64(x):
    """A float64 CPU tensor from a tensor or numpy array."""
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to('cpu', torch.float64)


# -----------------------------------------------------------------------------
# Frechet distance

def feature_statistics(features):
    """Mean [D] and unbiased covariance [D, D] of features [N, D], as FID uses them."""
    features = _float64(features)
    if features.shape[0] < 2:
        raise ValueError(f'a covariance needs at least 2 feature vectors, got {features.shape[0]}')
    mean = features.mean(0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _sqrtm_psd(matrix):
    """Square root of a symmetric positive semi-definite matrix; round-off negative eigenvalues count as 0."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the Frechet distance of two Gaussians (FID on features)."""
    mu1, sigma1, mu2, sigma2 = map(_float64, (mu1, sigma1, mu2, sigma2))
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2); the inner matrix is symmetric PSD, so eigh is exact and
    # stable where scipy's sqrtm on the non-symmetric S1 S2 can return complex round-off.
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    distance = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_covmean
    return max(float(distance), 0.0)  # a squared distance: round-off can only push it below 0


def fid_from_features(features_a, features_b):
    """The Frechet distance between the Gaussians fitted to two feature matrices [N, D] and [M, D]."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# -----------------------------------------------------------------------------
# Kernel inception distance

def _polynomial_kernel(x, y):
    """k(x, y) = (x.y / d + 1)^3 for rows of x [n, d] and y [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(features_a, features_b, num_subsets=100, subset_size=1000, seed=0):
    """(mean, std) over random subsets of the unbiased MMD^2 between two feature sets, cubic polynomial kernel.

    Each subset draws `subset_size` rows (at most the smaller set's size) from each set without replacement.
    """
    a, b = _float64(features_a), _float64(features_b)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f'KID needs at least 2 feature vectors in each set, got {len(a)} and {len(b)}')
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(num_subsets):
        x = a[torch.randperm(len(a), generator=generator)[:size]]
        y = b[torch.randperm(len(b), generator=generator)[:size]]
        k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
        # Unbiased: the diagonals k(x_i, x_i) are left out of the within-set means.
        within = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (size * (size - 1))
        estimates.append(float(within - 2 * k_xy.mean()))
    estimates = np.array(estimates)
    return float(estimates.mean()), float(estimates.std())


# -----------------------------------------------------------------------------
# Precision and recall

def _squared_distances(x, y):
    """Squared Euclidean distances between rows of x [n, d] and y [m, d] -> [n, m]."""
    return ((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T).clamp(min=0)


def _float32(x):
    """A float32 CPU tensor: k-NN membership only compares distances, and float32 halves the time of 10k x 10k."""
    return _float64(x).float()


def knn_radii(features, k=3, batch_size=1000):
    """Squared distance from each row of features [N, D] to its k-th nearest other row -> [N] (float32)."""
    features = _float32(features)
    if len(features) < k + 1:
        raise ValueError(f'k-NN radii with k={k} need at least {k + 1} feature vectors, got {len(features)}')
    radii = []
    for start in range(0, len(features), batch_size):
        block = _squared_distances(features[start:start + batch_size], features)  # [B, N]
        # The k + 1 smallest, ascending: the first is the point itself (or a duplicate of it).
        radii.append(block.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(real, fake, k=3, batch_size=1000):
    """(precision, recall): the fraction of fake rows in the real k-NN manifold, and of real rows in the fake one.

    A manifold is the union of balls around each point reaching its k-th nearest neighbour (Kynkaanniemi et al.
    2019). Distances are computed `batch_size` rows at a time, so 10k x 10k sets need only [batch_size, N] memory.
    """
    real, fake = _float32(real), _float32(fake)
    real_radii, fake_radii = knn_radii(real, k, batch_size), knn_radii(fake, k, batch_size)
    fake_covered = torch.zeros(len(fake), dtype=torch.bool)
    real_covered = []
    for start in range(0, len(real), batch_size):
        block = _squared_distances(real[start:start + batch_size], fake)  # [B, M]
        fake_covered |= (block <= real_radii[start:start + batch_size, None]).any(0)
        real_covered.append((block <= fake_radii[None, :]).any(1))
    return float(fake_covered.double().mean()), float(torch.cat(real_covered).double().mean())


# -----------------------------------------------------------------------------
# Bits per dimension

def discretized_gaussian_log_probs(x, mean, log_scales):
    """log p(x) in nats for each pixel under a Gaussian(mean, exp(log_scales)) discretised to the 256 pixel values.

    x holds 8-bit pixels mapped to [-1, 1]; each value owns the bin x +- 1/255, and the two edge bins extend to
    -inf and +inf, so the 256 probabilities sum to 1. log_scales broadcasts against x (e.g. [C, 1, 1] for one
    scale per channel). Works in float64 with log-CDFs, so a pixel far in the tail gets a finite log-probability.
    """
    x, mean = _float64(x), _float64(mean)
    scale = _float64(log_scales).exp()
    lower = torch.where(x <= -1 + BIN_HALF_WIDTH / 2, -math.inf, (x - BIN_HALF_WIDTH - mean) / scale)
    upper = torch.where(x >= 1 - BIN_HALF_WIDTH / 2, math.inf, (x + BIN_HALF_WIDTH - mean) / scale)
    # P = Phi(upper) - Phi(lower). In the right tail both CDFs round to 1, so use the mirror image
    # Phi(-lower) - Phi(-upper) there; then log P = log Phi(hi) + log(1 - exp(log Phi(lo) - log Phi(hi))).
    mirror = lower + upper > 0
    lo = torch.where(mirror, -upper, lower)
    hi = torch.where(mirror, -lower, upper)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_bits_per_dim(x, recon, log_scales):
    """-log2 p(x | z) per dimension for each image of x [B, C, H, W], decoded as `recon`, with the given log scales.

    log_scales is one per channel [C] or anything that broadcasts against x. Returns a float64 tensor [B].
    """
    x = _float64(x)
    log_scales = _float64(log_scales)
    if log_scales.dim() == 1:
        log_scales = log_scales[:, None, None]  # [C] -> [C, 1, 1]
    log_probs = discretized_gaussian_log_probs(x, recon, log_scales)  # [B, C, H, W]
    return -log_probs.flatten(1).sum(1) / (math.log(2) * x[0].numel())


FIT_VALUES = 2 ** 15  # values per channel that fit_log_scales uses at most


def fit_log_scales(x, recon, min_log_scale=math.log(1e-3), max_log_scale=math.log(2.0), tolerance=2e-3,
                   max_values=FIT_VALUES, seed=0):
    """One log scale per channel [C] maximising the discretised Gaussian likelihood of x [N, C, ...] given recon.

    x and recon are images [N, C, H, W] or pixels sampled from them [N, C, P], in [-1, 1]; meant for the training
    split. At most `max_values` values per channel enter the fit (a random subset drawn with `seed`): one number per
    channel is pinned to a fraction of a percent by them, and a scale off by a fraction e costs only about e^2 nats.
    The likelihood of one scale is unimodal in practice, so a coarse grid over [min_log_scale, max_log_scale]
    brackets the best point and a golden-section search narrows the bracket to `tolerance`.
    """
    x, recon = torch.as_tensor(x), torch.as_tensor(recon)
    channels = x.shape[1]
    x, recon = x.transpose(0, 1).reshape(channels, -1), recon.transpose(0, 1).reshape(channels, -1)  # [C, M]
    if x.shape[1] > max_values:
        chosen = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))[:max_values]
        x, recon = x[:, chosen], recon[:, chosen]
    x, recon = _float64(x), _float64(recon)

    def log_likelihood(log_scales):  # [C] -> [C]
        return discretized_gaussian_log_probs(x, recon, log_scales[:, None]).sum(1)

    grid = torch.linspace(min_log_scale, max_log_scale, 9, dtype=torch.float64)  # [G]
    totals = torch.stack([log_likelihood(value.expand(channels)) for value in grid])  # [G, C]
    best = grid[totals.argmax(0)]  # [C]
    step = grid[1] - grid[0]
    low, high = (best - step).clamp(min=min_log_scale), (best + step).clamp(max=max_log_scale)
    golden = (math.sqrt(5) - 1) / 2
    inner_low, inner_high = high - golden * (high - low), low + golden * (high - low)
    at_low, at_high = log_likelihood(inner_low), log_likelihood(inner_high)
    while float((high - low).max()) > tolerance:
        # Keep the part of the bracket around the better inner point; the other inner point of the narrower bracket
        # is the one new evaluation per channel.
        right = at_high > at_low
        low, high = torch.where(right, inner_low, low), torch.where(right, high, inner_high)
        probe = torch.where(right, low + golden * (high - low), high - golden * (high - low))
        at_probe = log_likelihood(probe)
        inner_low, inner_high = torch.where(right, inner_high, probe), torch.where(right, probe, inner_low)
        at_low, at_high = torch.where(right, at_high, at_probe), torch.where(right, at_probe, at_low)
    return torch.where(at_high > at_low, inner_high, inner_low)


def bits_per_dim(latent_nats_total, decoder_bits_per_dim, num_dims):
    """Split and total bits/dim of a VQ model: latent = (prior nats summed over all code levels) / ln 2 / (C*H*W).

    latent_nats_total is -log p(codes) per image (a number or a tensor [B], averaged); decoder_bits_per_dim is
    -log2 p(x | codes) / (C*H*W) (a number or a tensor [B], averaged); num_dims = C*H*W. Returns a dict with
    'latent_bits_per_dim', 'decoder_bits_per_dim' and their sum 'bits_per_dim'.
    """
    latent = float(_float64(latent_nats_total).mean()) / math.log(2) / num_dims
    decoder = float(_float64(decoder_bits_per_dim).mean())
    return {'latent_bits_per_dim': latent, 'decoder_bits_per_dim': decoder, 'bits_per_dim': latent + decoder}
