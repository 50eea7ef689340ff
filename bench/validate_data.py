"""How fast `mistral-tune validate-data` checks a real file, next to training's own data preparation.

Runs the real command (a fresh process each round) on Alpaca 5,000 with a SentencePiece tokenizer
(mistral_tiny: v1) and a Tekken one (mistral_nemo_tiny), and reports the command's wall time and the
rows/s it prints for its check (reading, converting and tokenizing every row). For scale, the same
rows go through training's `prepare_sft_data` in this process, timed side by side in each round.
Skipped when the data file is absent.

Command (writes bench/results/validate_data/results.{json,md}):
    python bench/validate_data.py --repeat 3 --out bench/results/validate_data
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT

DATA = Path(os.environ.get("ALPACA_JSON", "/work/shared/data/alpaca_5000.json"))
MODELS = ("mistral_tiny", "mistral_nemo_tiny")


def command(model: str) -> list[str]:
    return [sys.executable, "-m", "mistral_tune", "validate-data", "recipe=sft_lora", f"model={model}",
            f"data.path={DATA}", "trainer.max_length=512"]  # fmt: skip


def run_command(model: str) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(command(model), cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True)  # fmt: skip
    wall = time.perf_counter() - started
    found = re.search(
        r"checked (\d+) rows in ([\d.]+) s \(([\d,]+) rows/s.*?loading the tokenizer in ([\d.]+) s", proc.stdout
    )
    rows, check_s, _, tok_s = found.groups()
    return {"wall_s": wall, "rows": int(rows), "check_s": float(check_s), "tokenizer_s": float(tok_s)}


def prepare_seconds(model: str) -> float:
    """Training's data path on the same file: load, split, tokenize into a datasets.Dataset."""
    import logging

    from mistral_tune.cli.validate import load_tokenizer
    from mistral_tune.config.compose import compose
    from mistral_tune.data.sft import prepare_sft_data

    logging.getLogger("mistral_tune.data").setLevel(logging.ERROR)
    cfg = compose("sft_lora", [f"model={model}", f"data.path={DATA}", "trainer.max_length=512"])
    tokenizer, _ = load_tokenizer(cfg)
    started = time.perf_counter()
    prepare_sft_data(cfg.data, cfg.trainer, tokenizer)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="bench/results/validate_data")
    args = parser.parse_args()
    if not DATA.exists():
        print(f"skipped: {DATA} not found (set ALPACA_JSON=/path/to/alpaca_5000.json)")
        return 0
    rounds: dict[str, list[dict]] = {m: [] for m in MODELS}
    for r in range(args.repeat):
        for model in MODELS:  # round-robin, so a load spike hits both
            result = run_command(model)
            result["prepare_sft_data_s"] = prepare_seconds(model)
            result["load_average"] = round(os.getloadavg()[0], 2)
            rounds[model].append(result)
            print(f"round {r} {model}: {json.dumps(result)}", flush=True)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "data": str(DATA), "cpu_count": os.cpu_count(),
               "command": " ".join(command("MODEL")[1:]), "rounds": rounds, "median": {}}  # fmt: skip
    lines = [
        "| tokenizer | rows | command wall s | check s | rows/s (check) | prepare_sft_data s |",
        "|---|---|---|---|---|---|",
    ]
    for model, rs in rounds.items():
        med = {
            k: statistics.median(x[k] for x in rs) for k in ("wall_s", "check_s", "tokenizer_s", "prepare_sft_data_s")
        }
        med["rows_per_s"] = rs[0]["rows"] / med["check_s"]
        summary["median"][model] = med
        lines.append(f"| {model} | {rs[0]['rows']:,} | {med['wall_s']:.2f} | {med['check_s']:.2f} | "
                     f"{med['rows_per_s']:,.0f} | {med['prepare_sft_data_s']:.2f} |")  # fmt: skip
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
