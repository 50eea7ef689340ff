"""GPUs the dry run can estimate for: usable memory and dense peak throughput from vendor datasheets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    """A GPU the dry run can estimate for: usable memory and dense (no sparsity) peak throughput."""

    name: str
    memory_gib: float
    bf16_tflops: float  # 16-bit tensor-core peak
    tf32_tflops: float  # what fp32 matmuls get (TF32 tensor cores)


# Vendor datasheet peaks (dense). memory_gib is what the driver reports as usable.
GPUS = {
    "H100": Gpu("H100 SXM 80GB", 79.2, 989.4, 494.7),
    "H200": Gpu("H200 SXM 141GB", 139.8, 989.4, 494.7),
    "A100": Gpu("A100 SXM 80GB", 79.2, 312.0, 156.0),
    "L4": Gpu("L4 24GB", 22.5, 121.0, 60.5),
}
