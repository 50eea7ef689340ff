"""The keras-hub-style Python API: MistralBackbone and MistralCausalLM (MistralTokenizer is in models)."""
