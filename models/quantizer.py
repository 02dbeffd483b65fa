"""Vector quantizer: nearest-code lookup, EMA or loss-based codebook learning, dead-code restarts.

Shapes: the quantizer takes channels-first feature maps `z` of shape [B, D, H, W] (D = embedding_dim) and returns
quantized maps of the same shape plus code indices [B, H, W].
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _all_reduce(tensor):
    """Sum a tensor over DDP ranks in place, so every replica sees the same statistics; a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _broadcast(tensor):
    """Copy rank 0's tensor to every rank, so random choices agree; a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def code_statistics(counts):
    """(perplexity, fraction of codes used) from code counts [K]; perplexity = exp(entropy of the code frequencies)."""
    counts = counts.detach().float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-30))).sum()
    return torch.exp(entropy), (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    """Maps each D-dim feature vector to its nearest of `num_embeddings` codes, with straight-through gradients.

    With `ema=True` (default) the codebook follows an exponential moving average of the vectors assigned to each code
    (van den Oord et al. 2017, appendix A.1) and only the commitment term reaches the encoder. With `ema=False` the
    codebook is learned by the loss ||sg(z) - e||^2. Codes whose EMA cluster size falls below
    `dead_code_threshold` are restarted from random encoder outputs of the current batch.
    """

    def __init__(self, num_embeddings=512, embedding_dim=64, commitment_cost=0.25, ema=True, decay=0.99,
                 epsilon=1e-5, dead_code_threshold=1.0):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.ema = ema
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold

        embedding = torch.randn(num_embeddings, embedding_dim) / embedding_dim ** 0.5
        if ema:
            self.register_buffer('embedding', embedding)
            # Each code starts as a cluster of one vector that sits on it, so that embed_avg / cluster_size equals
            # the code itself before any update. Starting the sizes at zero instead would shrink the first updates
            # towards zero by the factor (1 - decay).
            self.register_buffer('cluster_size', torch.ones(num_embeddings))
            self.register_buffer('embed_avg', embedding.clone())
        else:
            self.embedding = nn.Parameter(embedding)

    def codebook(self):
        """The current codebook, [num_embeddings, embedding_dim]."""
        return self.embedding

    def nearest_codes(self, flat):
        """Index of the nearest code (squared L2) for each row of `flat` [N, D]."""
        codebook = self.codebook().float()
        distances = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t()
                     + codebook.pow(2).sum(1)[None, :])  # [N, K]
        return distances.argmin(1)

    def lookup(self, indices):
        """Code vectors for an index tensor [B, H, W] as a feature map [B, D, H, W]."""
        return F.embedding(indices, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z):
        """Quantize z [B, D, H, W]; returns (quantized with straight-through gradient, indices [B,H,W], stats dict)."""
        input_dtype = z.dtype
        # Distances and EMA sums lose codes in half precision, so the quantizer always works in float32.
        # (A shape-only trace on the meta device, for memory estimates, has no autocast of its own.)
        with torch.autocast(device_type='cpu' if z.device.type == 'meta' else z.device.type, enabled=False):
            z = z.float()
            b, d, h, w = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # [N, D], N = B*H*W
            indices = self.nearest_codes(flat.detach())  # [N]
            # Counts and sums per code by scattering, not through a dense one-hot [N, K] matrix: that matrix and
            # its product with `flat` cost hundreds of MB per step at 64x64 codes and 512 entries.
            if indices.device.type == 'meta':  # a shape-only trace (memory estimates) has no values to count
                counts = flat.new_zeros(self.num_embeddings)
            else:
                counts = torch.bincount(indices, minlength=self.num_embeddings).float()  # [K]

            if self.training and self.ema:
                self._ema_update(flat.detach(), indices, counts)

            quantized = F.embedding(indices, self.codebook().float()).view(b, h, w, d).permute(0, 3, 1, 2)
            commitment_loss = F.mse_loss(z, quantized.detach())
            loss = self.commitment_cost * commitment_loss
            if not self.ema:
                loss = loss + F.mse_loss(quantized, z.detach())
            quantized_st = z + (quantized - z).detach()

            perplexity, usage = code_statistics(counts)
            stats = {
                'vq_loss': loss,
                'commitment_loss': commitment_loss.detach(),
                'perplexity': perplexity,
                'code_usage': usage,
                'code_counts': counts,
            }
        return quantized_st.to(input_dtype), indices.view(b, h, w), stats

    @torch.no_grad()
    def _ema_update(self, flat, indices, counts):
        """One EMA step of cluster sizes and sums (summed over DDP ranks), Laplace smoothing, then dead-code restarts."""
        counts = _all_reduce(counts.clone())  # [K]
        sums = _all_reduce(flat.new_zeros(self.num_embeddings, flat.shape[1]).index_add_(0, indices, flat))  # [K, D]
        # Every vector lands in one row of the (all-reduced) sums, so all ranks agree whether a NaN/inf came in. Such a
        # batch must leave the codebook as it was: the trainer then stops with the state before it, or skips it.
        if not torch.isfinite(sums).all():
            return
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps a code that received nothing from dividing by zero.
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + self.num_embeddings * self.epsilon) * n
        self.embedding.copy_(self.embed_avg / smoothed[:, None])
        self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat):
        """Move codes whose EMA cluster size fell below the threshold onto random encoder outputs of this batch."""
        if self.dead_code_threshold <= 0:
            return
        dead = self.cluster_size < self.dead_code_threshold  # same on every rank: the sizes were all-reduced
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        picks = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
        new_codes = _broadcast(flat[picks].contiguous())
        self.embedding[dead] = new_codes
        self.embed_avg[dead] = new_codes
        self.cluster_size[dead] = 1.0
