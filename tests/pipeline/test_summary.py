"""summary.json's caveats and accuracies: what the numbers of a run mean, printed with them."""

from mistral_tune.config.compose import compose
from mistral_tune.pipeline.summary import run_notes
from mistral_tune.tracking.report import format_summary


def test_random_base_and_training_only_accuracy_are_called_out():
    demo = run_notes(compose("dpo_lora", []), has_accuracy=True, has_eval_accuracy=False)
    assert len(demo) == 2 and "memorisation" in demo[0] and "data.eval_split" in demo[1]
    # A pretrained base with an eval split: nothing to warn about.
    assert run_notes(compose("dpo_lora", ["model=mistral_7b_en"]), has_accuracy=True, has_eval_accuracy=True) == []
    # SFT on the demo base logs no accuracy: only the random-base note.
    assert len(run_notes(compose("sft_lora", []), has_accuracy=False, has_eval_accuracy=False)) == 1


def test_printed_summary_shows_training_and_held_out_accuracy_and_notes():
    summary = {"steps": 3, "final_accuracy": 0.975, "final_eval_accuracy": 0.51, "notes": ["the base is random"],
               "data": {"length_notice": {"message": "41 of 76 training pairs (54%) were over ..."}}}  # fmt: skip
    text = format_summary(summary)
    assert "accuracy     0.975 on training pairs, 0.51 on held-out pairs" in text
    assert "note         the base is random" in text and "data         41 of 76 training pairs" in text
    summary.pop("final_eval_accuracy")
    assert "no held-out pairs (data.eval_split)" in format_summary(summary)
