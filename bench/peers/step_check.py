"""One LoRA (r=8, q/v, dropout 0.05) forward+backward of a packed 1024-token row, in whichever venv runs it,
with the page faults each step takes and whether the model's weights are still mapped from its safetensors
file (zero-copy load) or were copied into anonymous memory.

    python bench/peers/step_check.py /tmp/peers-bench/models/b [steps]
"""

import contextlib
import os
import resource
import sys
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def mapped_from_files() -> int:
    """Bytes of this process's mappings backed by a .safetensors file."""
    total = 0
    with open("/proc/self/smaps") as f:
        current = False
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                current = len(parts) >= 6 and parts[-1].endswith(".safetensors")
            elif current and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


t0 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
load_s = time.perf_counter() - t0
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
model.train()
print(
    f"torch {torch.__version__} transformers {transformers.__version__} threads {torch.get_num_threads()} "
    f"load {load_s:.1f} s; weights resident from .safetensors mappings: {mapped_from_files() / 2**20:.0f} MiB",
    flush=True,
)
torch.manual_seed(0)
ids = torch.randint(3, model.config.vocab_size, (1, 1024))
positions = torch.cat([torch.arange(n) for n in [90] * 11 + [34]]).unsqueeze(0)
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
for i in range(steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    profile = os.environ.get("STEP_PROFILE") and i == steps - 1  # the last step, ops by self CPU time
    with torch.profiler.profile(record_shapes=True) if profile else contextlib.nullcontext() as prof:
        model(input_ids=ids, labels=ids, position_ids=positions).loss.backward()
    dt = time.perf_counter() - t
    if profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
        print(
            prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=30, max_shapes_column_width=70
            )
        )
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"step {i}: {dt:.1f} s, minor faults {r1.ru_minflt - r0.ru_minflt}, major {r1.ru_majflt - r0.ru_majflt}, "
        f"sys {r1.ru_stime - r0.ru_stime:.1f} s, user {r1.ru_utime - r0.ru_utime:.1f} s; "
        f".safetensors-backed RSS {mapped_from_files() / 2**20:.0f} MiB",
        flush=True,
    )
