"""Test and benchmark support shipped with the pack; the nodes never import it. ``weights`` writes
random-weight checkpoints in the real Z-Image-Turbo layouts."""
