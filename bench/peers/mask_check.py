"""One forward+backward of a packed 1024-token row of a model directory, with LLaMA-Factory's all-ones 2-D
mask and with restarting position_ids (mistral-tune's and TRL's packing), interleaved twice.

    python bench/peers/mask_check.py /tmp/peers-bench/models/b
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model.requires_grad_(False)
model.model.embed_tokens.weight.requires_grad_(True)  # so backward runs through every layer
torch.manual_seed(0)
ids = torch.randint(3, model.config.vocab_size, (1, 1024))
positions = torch.cat([torch.arange(n) for n in [90] * 11 + [34]]).unsqueeze(0)  # 12 examples in one row


def step(**kw) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids, **kw).loss.backward()
    return time.perf_counter() - t0


for r in range(2):
    ones = step(attention_mask=torch.ones_like(ids))
    packed = step(position_ids=positions)
    print(
        f"round {r}: all-ones 2-D mask {ones:.1f} s  restarting position_ids {packed:.1f} s  ratio {packed / ones:.2f}"
    )
