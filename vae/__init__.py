"""The original Variational Autoencoder (Kingma & Welling, 2014) for Flowers102 images."""
