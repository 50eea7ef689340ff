"""Mistral models: preset data, where a model comes from, loading, attention backends, the tokenizer."""
