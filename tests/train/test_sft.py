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


@pytest.mark.slow
def test_bf16_on_a_cpu_trains_bf16_weights_with_an_fp32_adapter_and_exports(tmp_path, compose):
    """model.dtype=bfloat16 train.bf16=true on a machine without a GPU: autocast on the CPU (transformers
    alone refuses bf16 there unless use_cpu is set), frozen weights in bf16, the LoRA weights in fp32."""
    import json

    import torch
    from transformers import TrainerCallback

    from mistral_tune.pipeline.run import run

    seen = {}

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            params = dict(model.named_parameters())
            seen["use_cpu"], seen["bf16"] = args.use_cpu, args.bf16
            seen["frozen"] = {p.dtype for p in params.values() if not p.requires_grad}
            seen["trained"] = {p.dtype for p in params.values() if p.requires_grad}

    run_dir = tmp_path / "run"
    overrides = ["model.dtype=bfloat16", "train.bf16=true", "train.max_steps=2", "train.logging_steps=1",
                 "export.num_samples=0", f"output_dir={run_dir}"]  # fmt: skip
    run(compose("sft_lora", overrides), callbacks=[Probe()])
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: autocast runs there, not on the CPU")
    assert seen == {"use_cpu": True, "bf16": True, "frozen": {torch.bfloat16}, "trained": {torch.float32}}
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]  # fmt: skip
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["merged"]["verified"] and summary["merged"]["dtype"] == "bfloat16"


def test_bf16_on_a_gpu_without_bf16_is_one_clear_error(monkeypatch):
    """A GPU without bf16 (a V100, say) must not fall back to the CPU silently."""
    import torch
    import transformers.utils

    from mistral_tune.core.errors import UserError
    from mistral_tune.train.base import bf16_on_cpu

    assert bf16_on_cpu({"bf16": False}) is False
    if not torch.cuda.is_available():
        assert bf16_on_cpu({"bf16": True}) is True  # this machine: no accelerator, the CPU runs bf16
    # No GPU here: the one thing mocked is what the device reports.
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: False)
    with pytest.raises(UserError, match="cuda device has no bf16.*train.fp16=true"):
        bf16_on_cpu({"bf16": True})
    monkeypatch.setattr(transformers.utils, "is_torch_bf16_gpu_available", lambda: True)
    assert bf16_on_cpu({"bf16": True}) is False
