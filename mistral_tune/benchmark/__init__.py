"""Benchmarks: the framework's training step against a bare PyTorch loop (``mistral-tune bench``).

- ``harness``: command line, one worker process per variant, JSON + markdown output (no torch import)
- ``worker``: builds a variant and times framework and bare steps, interleaved
- ``flops``: model FLOPs per step and MFU
- ``memory``: peak memory per phase (CUDA allocator peak, or sampled RSS on CPU)
"""
