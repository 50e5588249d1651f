"""The VAE objective: the closed-form KL and ELBOLoss. Pure functions; every value is in nats per image unless a
name says otherwise. The reconstruction term comes from the likelihood (vae/likelihoods.py)."""

from torch import nn

from vae.likelihoods import make_likelihood


def kl_per_dimension(mean, log_var):
    """KL(q(z|x) || N(0, I)) in nats for each image and latent dimension, closed form, shape (batch, D): a
    spatial latent (batch, C, H, W) is flattened to D = C*H*W dimensions."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).flatten(1)


def kl_divergence(mean, log_var):
    """KL(q(z|x) || N(0, I)) per image (nats), shape (batch,)."""
    return kl_per_dimension(mean, log_var).sum(dim=1)


class ELBOLoss(nn.Module):
    """total = beta * KL + reconstruction, each averaged over the batch; returns (beta, kl, reconstruction, total).

    With the defaults this is the tutorial's loss: reconstruction = per-image SSE, kl = closed-form KL.
    likelihood: a Likelihood (pass the model's, model.likelihood, so a learned sigma is the model's) or its name.
    free_bits (nats) floors the batch-mean KL of each latent dimension inside `total` (Kingma et al. 2016);
    the returned kl is always the raw KL. beta may be changed between steps (KL schedules do).
    """

    def __init__(self, beta=0.1, likelihood="gaussian", free_bits=0.0):
        super().__init__()
        self.beta = beta
        self.likelihood = make_likelihood(likelihood)
        self.free_bits = free_bits

    def forward(self, x, parameters, mean, log_var):
        """parameters: the likelihood's parameters of p(x|z) (model(x, return_parameters=True)[0], or
        model.decode_parameters(z)); for the Gaussians and the Bernoulli they are the reconstruction itself, so
        ELBOLoss(beta)(x, *model(x)) is the tutorial's loss."""
        kl_dims = kl_per_dimension(mean, log_var).mean(dim=0)
        kl = kl_dims.sum()
        kl_term = kl_dims.clamp(min=self.free_bits).sum() if self.free_bits > 0 else kl
        reconstruction_term = self.likelihood.loss(x, parameters).mean()
        total = self.beta * kl_term + reconstruction_term
        return self.beta, kl, reconstruction_term, total
