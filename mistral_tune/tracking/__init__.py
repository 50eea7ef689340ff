"""Run tracking: metrics.jsonl, W&B and TensorBoard, progress lines, plots and the printed summary."""
