"""sftkit: supervised fine-tuning of causal language models from one recipe file."""

__version__ = "0.1.0"
