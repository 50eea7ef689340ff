"""Canaries for the transformers internals in mistral_tune/compat/transformers.py, on real tiny models.

Each fails naming transformers, its installed version and the symbol when an upgrade changes it.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from mistral_tune.compat import broken
from mistral_tune.compat import transformers as compat


def tiny_model(**kwargs):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    if kwargs:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, **kwargs).eval()
    return MistralForCausalLM(config).eval()


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize(
    "hook, expected",
    [
        ("hf_output_dir", ["self", "trial"]),
        ("hf_save_checkpoint", ["self", "model", "trial"]),
        ("hf_grad_norm", ["self", "model", "grad_norm"]),
    ],
)
def test_trainer_private_methods_keep_their_parameters(hook, expected):
    from transformers import Trainer

    private = compat.TRAINER_PRIVATES[hook]
    method = getattr(Trainer, private, None)
    assert method is not None, broken("transformers", f"Trainer.{private}", "is gone")
    assert params(method) == expected, broken("transformers", f"Trainer.{private}", f"takes {params(method)}")


def test_trainer_calls_our_checkpoint_and_grad_norm_hooks(tmp_path):
    """A real two-step Trainer run reaches every public-named hook the compat mixins forward to."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    calls: list[str] = []

    class Probe(compat.CheckpointHooks, compat.GradNormHooks, Trainer):
        def checkpoint_output_dir(self, trial):
            calls.append("checkpoint_output_dir")
            return super().checkpoint_output_dir(trial)

        def write_checkpoint(self, model, trial):
            calls.append("write_checkpoint")
            super().write_checkpoint(model, trial)

        def grad_norm_hook(self, model, grad_norm=None):
            calls.append("grad_norm_hook")
            return super().grad_norm_hook(model, grad_norm)

    ids = [[2, 5, 6, 7, 1]] * 4
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, logging_steps=1, max_grad_norm=1.0, disable_tqdm=True, save_only_model=True,
    )  # fmt: skip
    trainer = Probe(model=tiny_model().train(), args=args, train_dataset=data)
    trainer.train()
    for hook, private in compat.TRAINER_PRIVATES.items():
        public = {"hf_output_dir": "checkpoint_output_dir", "hf_save_checkpoint": "write_checkpoint"}.get(
            hook, "grad_norm_hook"
        )
        assert public in calls, broken("transformers", f"Trainer.{private}", "is no longer called by train()")
    assert compat.trainer_output_dir(trainer) == str(tmp_path), broken(
        "transformers", f"Trainer.{compat.TRAINER_PRIVATES['hf_output_dir']}", "no longer returns args.output_dir"
    )
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file(), broken(
        "transformers", f"Trainer.{compat.TRAINER_PRIVATES['hf_save_checkpoint']}", "no longer writes checkpoint-N"
    )


def test_checkpoint_loader_loads_a_checkpoints_weights_without_training(tmp_path):
    """``Trainer._load_from_checkpoint`` (resume=auto of a finished run) puts a checkpoint's weights in the model."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    method = getattr(Trainer, compat.CHECKPOINT_LOADER, None)
    assert method is not None, broken("transformers", f"Trainer.{compat.CHECKPOINT_LOADER}", "is gone")
    assert params(method)[:2] == ["self", "resume_from_checkpoint"], broken(
        "transformers", f"Trainer.{compat.CHECKPOINT_LOADER}", f"takes {params(method)}"
    )
    ids = [[2, 5, 6, 7, 1]] * 4
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=2, report_to=[],
        use_cpu=True, learning_rate=0.1, disable_tqdm=True, save_only_model=True,
    )  # fmt: skip
    trained = Trainer(model=tiny_model().train(), args=args, train_dataset=data)
    trained.train()
    fresh = Trainer(model=tiny_model().train(), args=args, train_dataset=data)
    name, weight = next(iter(trained.model.state_dict().items()))
    assert not torch.equal(fresh.model.state_dict()[name], weight)
    compat.load_checkpoint_weights(fresh, str(tmp_path / "checkpoint-2"))
    for key, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value), broken(
            "transformers", f"Trainer.{compat.CHECKPOINT_LOADER}", f"no longer loads {key}"
        )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attn_implementation_reads_what_the_model_runs(attn):
    model = tiny_model(attn_implementation=attn)
    assert compat.attn_implementation(model.config) == attn, broken(
        "transformers", f"PretrainedConfig.{compat.ATTN_IMPLEMENTATION}", f"is not {attn!r} for a model built with it"
    )


def test_drop_quantization_leaves_a_config_that_builds_a_plain_model():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = tiny_model().config
    config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    setattr(config, compat.PRE_QUANTIZATION_DTYPE, torch.float32)  # what transformers < 5.24 left there
    compat.drop_quantization(config)
    assert not hasattr(config, "quantization_config") and not hasattr(config, compat.PRE_QUANTIZATION_DTYPE)
    fresh = AutoModelForCausalLM.from_config(config)
    assert "quantization_config" not in fresh.config.to_dict(), broken(
        "transformers", "PretrainedConfig.quantization_config", "survives deletion"
    )
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in fresh.modules())


def test_generate_hands_a_custom_decoding_method_its_cache_and_pad_token():
    """What contrastive search relies on: the cache generate() prepared, the resolved pad token, the
    keyword forward() takes the cache under, and the cache's in-place batch repeat/select."""
    model = tiny_model()
    seen: dict = {}

    def probe(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
              streamer=None, **model_kwargs):  # fmt: skip
        seen["cache"] = compat.generation_cache(model_kwargs)
        seen["pad"] = compat.generation_pad_token(generation_config)
        seen["keys"] = sorted(model_kwargs)
        return input_ids

    prompt = torch.tensor([[2, 5, 6, 7]])
    model.generate(prompt, custom_generate=probe, max_new_tokens=3, do_sample=False)
    cache = seen["cache"]
    assert cache is not None, broken(
        "transformers",
        "generate(custom_generate=...)",
        f"hands no cache under {compat.CACHE_KEYWORDS} ({seen['keys']})",
    )
    assert seen["pad"] is not None and int(seen["pad"]) == 0, broken(
        "transformers", f"GenerationConfig.{compat.PAD_TOKEN_TENSOR}", f"is {seen['pad']!r}, not the pad token 0"
    )
    for method in ("batch_repeat_interleave", "batch_select_indices"):
        assert callable(getattr(cache, method, None)), broken(
            "transformers", f"{type(cache).__name__}.{method}", "is gone"
        )

    kwargs = compat.cache_argument(model, cache)
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True, **kwargs)
        assert cache.get_seq_length() == 4, broken(
            "transformers", f"forward({next(iter(kwargs))}=...)", "did not fill the cache it was given"
        )
        compat.repeat_cache(cache, 3)
        step = model(input_ids=torch.tensor([[8], [9], [8]]), use_cache=True, **kwargs).logits[:, -1]
        assert torch.allclose(step[0], step[2], atol=1e-6) and not torch.allclose(step[0], step[1]), broken(
            "transformers", f"{type(cache).__name__}.batch_repeat_interleave", "did not repeat each row"
        )
        compat.select_cache(cache, torch.tensor([1]))
        one = model(input_ids=torch.tensor([[8]]), use_cache=True, **kwargs).logits[:, -1]
    assert one.shape[0] == 1 and cache.get_seq_length() == 6, broken(
        "transformers", f"{type(cache).__name__}.batch_select_indices", "did not keep only the selected row"
    )
    assert out.logits.shape[:2] == (1, 4)


def test_a_cache_made_for_a_model_that_got_none_fills_and_extends():
    """transformers 5.0 hands a custom decoding method no cache; contrastive search then makes its own:
    it must take the prompt's keys/values and continue from them exactly as a full forward does."""
    model = tiny_model()
    assert compat.generation_cache({}) is None
    cache = compat.generation_cache({}, model)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        model(input_ids=ids[:, :4], use_cache=True, **compat.cache_argument(model, cache))
        step = model(input_ids=ids[:, 4:], use_cache=True, **compat.cache_argument(model, cache)).logits[:, -1]
        full = model(input_ids=ids).logits[:, -1]
    assert cache.get_seq_length() == 5, broken("transformers", "DynamicCache(config=...)", "did not fill")
    assert torch.allclose(step, full, atol=1e-5), broken(
        "transformers", "DynamicCache(config=...)", "differs from a full pass"
    )


def test_tekken_converter(tmp_path):
    """transformers' Tekken converter: mistral-common's id layout (specials first) and tiktoken's ids."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from tests.helpers import tiny_tekken_file

    path = tiny_tekken_file(tmp_path / "tekken_tiny.json")
    try:
        tok = compat.tekken_to_tokenizers(path)
    except (ImportError, AttributeError, TypeError) as exc:
        pytest.fail(broken("transformers", "integrations.mistral.MistralConverter", f"fails ({exc})"))
    reference = Tekkenizer.from_file(path)
    for piece in ("<unk>", "<s>", "</s>", "[INST]", "<pad>", "<SPECIAL_23>"):
        assert reference.id_to_piece(tok.token_to_id(piece)) == piece, broken(
            "transformers", "integrations.mistral.MistralConverter", f"puts {piece} elsewhere"
        )
    for text in ["hello world", "  hello\n\nworld wor", "héllo 🤖"]:
        assert tok.encode(text, add_special_tokens=False).ids == reference.encode(text, bos=False, eos=False), broken(
            "transformers", "integrations.mistral.MistralConverter", f"encodes {text!r} differently"
        )


# --- Mixtral experts (QLoRA stores them in 4-bit itself: adapters/experts4bit.py) ---------------------


@pytest.fixture(scope="module")
def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    return MixtralForCausalLM(config).eval()


def test_mixtral_experts_are_one_module_of_two_3d_parameters_per_layer(tiny_mixtral):
    names = compat.experts_modules(tiny_mixtral)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"], broken(
        "transformers", "MixtralExperts", f"is found at {names}"
    )
    experts = tiny_mixtral.get_submodule(names[0])
    gate_up, down = compat.expert_weights(experts)  # raises on another layout
    assert tuple(gate_up.shape) == (3, 48, 16) and tuple(down.shape) == (3, 16, 24)
    # the forward's contract: experts(hidden [tokens, hidden], top_k_index, top_k_weights), gate rows before up
    x, index, weights = torch.randn(5, 16), torch.tensor([[0, 2], [1, 0], [2, 1], [0, 1], [2, 0]]), torch.rand(5, 2)
    expected = torch.zeros(5, 16)
    for t in range(5):
        for k in range(2):
            e = int(index[t, k])
            gate, up = gate_up[e, :24] @ x[t], gate_up[e, 24:] @ x[t]
            expected[t] += weights[t, k] * (down[e] @ (experts.act_fn(gate) * up))
    with torch.no_grad():
        got = experts(x, index, weights)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), broken(
        "transformers", "MixtralExperts.forward", "no longer computes down(act(gate x) * up x) per routed expert"
    )


def test_mixtral_checkpoints_keep_w1_gate_w3_up_w2_down_per_expert(tiny_mixtral, tmp_path):
    from safetensors.torch import load_file

    tiny_mixtral.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    gate_up, down = compat.expert_weights(tiny_mixtral.get_submodule("model.layers.1.mlp.experts"))
    for e in range(3):
        for projection, expected in (("gate", gate_up[e, :24]), ("up", gate_up[e, 24:]), ("down", down[e])):
            key = compat.expert_checkpoint_name("model.layers.1.mlp.experts", e, projection) + ".weight"
            assert key in saved, broken("transformers", "Mixtral's checkpoint layout", f"has no {key}")
            assert torch.equal(saved[key], expected), broken("transformers", key, f"is not expert {e}'s {projection}")
    assert compat.EXPERT_CHECKPOINT_INFIX in key
