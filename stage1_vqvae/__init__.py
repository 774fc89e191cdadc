"""Stage 1: the VQ-VAE that turns images into a grid of discrete codes and back."""
