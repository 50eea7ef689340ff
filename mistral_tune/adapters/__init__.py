"""Adapters on the base model: LoRA, DoRA, QLoRA (4-bit base) or none (full fine-tuning)."""
