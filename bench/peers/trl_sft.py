"""The same job through TRL's stock ``SFTTrainer`` (no mistral-tune code): Alpaca rows rendered as a
conversational prompt/completion (user: instruction, a blank line, input; assistant: output), the
model directory's own chat template, LoRA via PEFT. Options not given keep TRL's defaults."""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--gradient-checkpointing", choices=["true", "false"], default=None)  # None: TRL's default
    ap.add_argument("--packing", choices=["true", "false"], default=None)
    ap.add_argument("--bf16", choices=["true", "false"], default="false")  # true: bf16 weights and autocast
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = json.load(open(args.data))

    def render(r):
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }

    dataset = Dataset.from_list([render(r) for r in rows])
    extra = {}
    if args.gradient_checkpointing is not None:
        extra["gradient_checkpointing"] = args.gradient_checkpointing == "true"
    if args.packing is not None:
        extra["packing"] = args.packing == "true"
    config = SFTConfig(
        output_dir=args.output_dir,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=0,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16 == "true",
        use_cpu=True,
        seed=args.seed,
        **extra,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if args.bf16 == "true" else torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
