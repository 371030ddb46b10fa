"""latentloom: distributed training of CLIP, the KL autoencoder and text-conditioned latent diffusion."""

__version__ = "0.1.0"
