"""tuneforge: a fine-tuning pipeline for causal language models."""

__version__ = "0.1.0"
