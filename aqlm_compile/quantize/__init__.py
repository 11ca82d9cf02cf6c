"""The AQLM algorithm (Egiazarian et al. 2024): k-means init, beam search over codes, Adam on codebooks,
block fine-tuning, optional global KL fine-tuning. No file I/O here: checkpoints go through `format.py`."""
