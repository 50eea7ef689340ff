"""One thin TRL trainer per method (sft, dpo, reward) on a shared base: checkpoints, resume, signals."""
