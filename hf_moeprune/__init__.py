"""hf_moeprune: prune and merge the experts of Hugging Face Mixture-of-Experts models."""

__version__ = "0.1.0"
