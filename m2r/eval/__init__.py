"""Evaluation: metrics under three protocols, the public test-set layouts, and tiled inference."""
