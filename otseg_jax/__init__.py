"""OTSeg and related zero-shot segmentation methods in JAX/Flax."""
