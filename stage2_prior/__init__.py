"""Stage 2: autoregressive priors (Transformer, gated PixelCNN) over stage-1 codes."""
