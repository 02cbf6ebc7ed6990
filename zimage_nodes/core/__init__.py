"""ComfyUI-free torch logic of the pack: checkpoint identification and loading, the DiT, the text
encoder, the VAE, the sampling schedules and loops. Nothing here imports ComfyUI."""
