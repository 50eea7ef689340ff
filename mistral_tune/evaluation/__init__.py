"""Evaluation with lm-evaluation-harness: ``harness`` (what ``mistral-tune eval`` and ``eval.tasks=``
run) and ``tasks`` (our offline tasks, lm-eval's hub tasks)."""
