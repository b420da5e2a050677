"""Fused or chunked compute: attention backends, linear + cross-entropy, tiled MLP, RMSNorm / RoPE / SwiGLU."""
