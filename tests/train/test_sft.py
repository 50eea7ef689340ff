import pytest


@pytest.mark.slow
def test_gradient_checkpointing_is_on_during_training_only_when_asked(tmp_path, compose):
    """train.gradient_checkpointing reaches the model (transformers 5.2x calls it activation_checkpointing)."""
    from transformers import TrainerCallback

    from mistral_tune.pipeline.run import run

    seen = []

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append(model.get_base_model().is_activation_checkpointing)

    for flag in (True, False):
        overrides = [f"train.gradient_checkpointing={flag}", "train.max_steps=1", "export.merged=false",
                     "export.num_samples=0", f"output_dir={tmp_path / str(flag)}"]  # fmt: skip
        run(compose("sft_lora", overrides), callbacks=[Probe()])
    assert seen == [True, False]
