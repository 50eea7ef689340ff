"""Prepare the shared inputs of the peer benchmark (runs in the project's venv).

- models/<shape>/: a Hugging Face directory (safetensors, config, tokenizer with chat template) written by
  mistral-tune's own preset export, with the same seed for every tool:
    a  = the `mistral_tiny` preset (2 layers, hidden 256, the real 32000-piece v1 tokenizer);
    b  = a decoder-dominated random model: hidden 1024, 8 layers, 8 heads / 2 KV heads, intermediate 3584,
         the same 32000-piece vocabulary (built from mistral_tiny's config with those overrides).
- data/alpaca_<N>.json: the first N rows of alpaca_5000.json (instruction/input/output), as every tool here
  reads Alpaca JSON; data/dataset_info.json for LLaMA-Factory.

Prints the shape's FLOPs split (LM head share) for shape b.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHAPE_B = dict(
    hidden_size=1024,
    num_hidden_layers=9,  # 8 puts the LM head at 21.2% of the FLOPs (see docs/BENCHMARKS.md)
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=3584,
    head_dim=128,
    max_position_embeddings=4096,
    sliding_window=None,  # seq 1024 < any window; none keeps every tool's attention path the same
    initializer_range=0.02,
)


def flops_split(config, seq_len: int) -> dict:
    """Forward+backward model FLOPs per token of LoRA training (frozen base: 4N per weight), split into
    decoder matmuls, causal attention (mean over positions of a full row) and the LM head."""
    h, L = config.hidden_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    decoder = 4 * L * per_layer
    attention = 12 * L * q * (seq_len + 1) / 2  # QK^T and AV, fwd+bwd, mean causal span
    head = 4 * h * config.vocab_size
    total = decoder + attention + head
    return {
        "decoder_flops_per_token": decoder,
        "attention_flops_per_token": attention,
        "lm_head_flops_per_token": head,
        "total_flops_per_token": total,
        "lm_head_share": head / total,
    }


def write_model(shape: str, out: Path, seed: int) -> dict:
    import torch

    from mistral_tune.api.causal_lm import MistralCausalLM
    from mistral_tune.export.preset import write_preset
    from mistral_tune.models.loading import preset_config
    from mistral_tune.models.presets import PRESETS

    lm = MistralCausalLM.from_preset("mistral_tiny", load_weights=False, dtype="float32", seed=seed)
    if shape == "a":
        model = lm.hf_model
    else:
        from transformers import AutoModelForCausalLM

        config = preset_config(PRESETS["mistral_tiny"], **SHAPE_B)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not (out / "config.json").exists():
        write_preset(model, lm.tokenizer, out, base_preset="mistral_tiny", provenance={"bench": f"peers shape {shape}"})
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "config": model.config.to_dict()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--seq-b", type=int, default=1024)
    args = ap.parse_args()
    rows = json.loads(args.data.read_text())
    if len(rows) < args.rows:
        print(f"error: {args.data} has {len(rows)} rows, fewer than --rows {args.rows}", file=sys.stderr)
        return 2
    data_dir = args.work / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    keep = [
        {"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]} for r in rows[: args.rows]
    ]
    (data_dir / "alpaca.json").write_text(json.dumps(keep))
    # LLaMA-Factory's registry of local data sets (its Alpaca format: instruction/input/output columns).
    (data_dir / "dataset_info.json").write_text(
        json.dumps({"bench_alpaca": {"file_name": "alpaca.json", "formatting": "alpaca"}}, indent=1)
    )
    info = {}
    for shape in ("a", "b"):
        info[shape] = write_model(shape, args.work / "models" / shape, args.seed)
    from transformers import AutoConfig

    fb = flops_split(AutoConfig.from_pretrained(args.work / "models" / "b"), args.seq_b)
    info["b"]["flops"] = fb
    print(
        f"shape b: {info['b']['parameters'] / 1e6:.1f}M parameters; LM head {fb['lm_head_share']:.1%} of LoRA "
        f"training FLOPs per token at seq {args.seq_b} ({fb['total_flops_per_token'] / 1e9:.2f} GFLOP/token)"
    )
    if fb["lm_head_share"] >= 0.20:
        print("error: shape b's LM head is not under 20% of the FLOPs", file=sys.stderr)
        return 1
    (args.work / "prepare.json").write_text(json.dumps(info, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
