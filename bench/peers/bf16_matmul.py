"""fp32 against bf16 for one of shape b's matmuls on this CPU (1024 tokens x hidden 1024 -> 3584, the MLP's
up projection), best of 5 after 2 warm-ups, 3 rounds interleaved. Tells whether bf16 is a lever here:
AVX512_BF16 (AMD Zen 4) or AMX (Intel Sapphire Rapids and later) run bf16 matmuls through oneDNN.

    python bench/peers/bf16_matmul.py
"""

import time

import torch


def best(a: torch.Tensor, b: torch.Tensor) -> float:
    for _ in range(2):
        a @ b.T
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b.T
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(1024, 1024), torch.randn(3584, 1024)
    flops = 2 * 1024 * 1024 * 3584
    for _ in range(3):
        f32 = best(x, w)
        bf16 = best(x.bfloat16(), w.bfloat16())
        print(
            f"fp32 {f32 * 1e3:.0f} ms ({flops / f32 / 1e9:.0f} GFLOP/s)  bf16 {bf16 * 1e3:.0f} ms "
            f"({flops / bf16 / 1e9:.0f} GFLOP/s)  fp32/bf16 {f32 / bf16:.2f}x"
        )
    print("oneDNN bf16 supported:", torch.ops.mkldnn._is_mkldnn_bf16_supported())


if __name__ == "__main__":
    main()
