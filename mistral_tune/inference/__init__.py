"""Generation, samplers (keras-hub's names), contrastive search, scoring and reward scoring."""
