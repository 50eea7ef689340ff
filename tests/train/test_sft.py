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


@pytest.mark.slow
def test_mixtral_router_loss_is_in_the_training_loss_for_every_loss_implementation(tmp_path, compose):
    """The chunked loss (no logits, no labels to the model) adds router_aux_loss_coef x the router's
    load-balancing loss exactly as MixtralForCausalLM's own (plain) loss does, and both log it."""
    import torch

    import mistral_tune.models.loading as models
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer
    from mistral_tune.train import sft

    def loss_of(impl, coef=None):
        overrides = ["model=mixtral_tiny", f"trainer.loss={impl}", "train.per_device_train_batch_size=4"]
        if coef is not None:
            overrides.append(f"model.router_aux_loss_coef={coef}")
        cfg = compose("sft_lora", overrides)
        source = resolve_source(cfg.model.name, cfg.model.path)
        tokenizer = load_tokenizer(source)
        model = models.load_model(cfg.model, source, seed=0)
        data = sft.prepare_data(cfg, tokenizer)
        trainer = sft.build_trainer(cfg, model, tokenizer, data, tmp_path / impl, [])
        batch = next(iter(trainer.get_train_dataloader()))
        model.train()
        with torch.no_grad():
            loss = trainer.compute_loss(model, dict(batch)).item()
        logged = {"loss": loss}
        trainer.log(logged)
        return loss, logged.get("aux_loss")

    plain, aux = loss_of("plain")
    chunked, aux_chunked = loss_of("chunked")
    assert chunked == pytest.approx(plain, abs=1e-5) and aux_chunked == pytest.approx(aux, abs=1e-6)
    without, _ = loss_of("chunked", coef=0.0)
    assert aux > 1.0 and chunked - without == pytest.approx(0.02 * aux, rel=1e-3)  # mixtral_tiny's coefficient
