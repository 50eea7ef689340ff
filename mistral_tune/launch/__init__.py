"""Multi-process runs through accelerate (DDP, FSDP, DeepSpeed ZeRO) and what each engine needs."""
