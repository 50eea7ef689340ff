"""mistral-tune: config-driven fine-tuning for Mistral models."""

__version__ = "0.1.0"
