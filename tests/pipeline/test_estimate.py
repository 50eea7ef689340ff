"""The memory/speed estimator: its activation terms against what autograd really saves, and the
7B QLoRA anchor against published figures."""

import pytest
import torch

import mistral_tune.pipeline.estimate as E
from mistral_tune.models.presets import PRESETS
from tests.helpers import TINY_CONFIG as TINY

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny forward passes: one thread is faster under load


def saved_bytes(model, ids):
    """Bytes of the distinct tensors autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


def tiny_model(layers, adapter, dropout, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**TINY, "num_hidden_layers": layers}, attn_implementation="sdpa"))
    if adapter != "none":
        target = "all-linear" if targets == ("all-linear",) else list(targets)
        model = get_peft_model(
            model, LoraConfig(r=8, lora_dropout=dropout, target_modules=target, task_type="CAUSAL_LM")
        )
    return model.train()


SEVEN_B = PRESETS["mistral_7b_en"].config


def anchor(**overrides):
    settings = {"batch_size": 1, "seq_len": 2048, "adapter": "qlora", "gradient_checkpointing": True, **overrides}
    shape = E.RunShape(**settings)
    trainable = E.lora_parameter_count(SEVEN_B, shape.targets, shape.lora_r)
    total = PRESETS["mistral_7b_en"].parameter_count + trainable
    return E.estimate_memory(SEVEN_B, shape, trainable=trainable, total=total), shape, trainable


@pytest.mark.parametrize(
    "adapter,dropout,targets",
    [
        ("lora", 0.0, ("q_proj", "v_proj")),
        ("lora", 0.05, ("q_proj", "v_proj")),
        ("lora", 0.0, ("all-linear",)),
        ("none", 0.0, ()),
    ],
)
def test_layer_activations_match_saved_tensors(adapter, dropout, targets):
    # The difference between a 3- and a 2-layer model is one steady-state layer (the first layer
    # is special: its input does not require grad). fp32 on CPU; the CPU dropout mask is a float.
    seq = 128  # > sliding window 32, so the sdpa mask is materialized as it is on GPU
    ids = torch.randint(3, 1000, (1, seq))
    measured = (
        saved_bytes(tiny_model(3, adapter, dropout, targets), ids)
        - saved_bytes(tiny_model(2, adapter, dropout, targets), ids)
    ) / seq
    shape = E.RunShape(
        seq_len=seq,
        adapter=adapter,
        target_modules=targets,
        lora_dropout=dropout,
        compute_bytes=4,
        attn="sdpa",
        dropout_mask_bytes=4,
    )
    estimated = sum(E.layer_activation_terms(TINY, shape).values())
    assert estimated == pytest.approx(measured, rel=0.02), (measured, E.layer_activation_terms(TINY, shape))


@pytest.mark.slow
def test_qlora_layer_activations_match_saved_tensors(tmp_path):
    """4-bit linears keep no inputs (bitsandbytes keeps only the packed weight)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def build(layers):
        tiny_model(layers, "none", 0, ()).save_pretrained(tmp_path / str(layers))
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / str(layers), dtype=torch.float32, attn_implementation="sdpa", quantization_config=quant
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return get_peft_model(model, lora).train()

    seq = 128
    ids = torch.randint(3, 1000, (1, seq))
    measured = (saved_bytes(build(3), ids) - saved_bytes(build(2), ids)) / seq
    shape = E.RunShape(seq_len=seq, adapter="qlora", compute_bytes=4, attn="sdpa", dropout_mask_bytes=4)
    assert sum(E.layer_activation_terms(TINY, shape).values()) == pytest.approx(measured, rel=0.02)


def test_7b_qlora_anchor_within_25_percent_of_published_figures():
    # Published QLoRA fine-tuning of a 7B model at seq 2048, batch 1, gradient checkpointing:
    # about 5-7 GiB. Within 25% of the middle of that range: 4.5-7.5 GiB.
    memory, _, _ = anchor()
    peak = memory.peak_bytes / E.GiB
    assert 4.5 <= peak <= 7.5, memory.terms
    weights = memory.terms["weights"][0] / E.GiB
    assert 3.9 <= weights <= 4.6  # 6.98B NF4 params (3.35 GiB) + embeddings/head in fp32 (0.98 GiB)
    # Without checkpointing every layer keeps its activations: several times more.
    assert memory.peak_bytes_other_checkpointing > 2.5 * memory.peak_bytes


def test_estimates_move_the_right_way():
    base, _, _ = anchor()
    longer, _, _ = anchor(seq_len=4096)
    bigger_adapter, _, _ = anchor(target_modules=("all-linear",), lora_r=64)
    assert longer.peak_bytes > base.peak_bytes and bigger_adapter.peak_bytes > base.peak_bytes
    full = E.RunShape(batch_size=1, seq_len=2048, adapter="none", gradient_checkpointing=True)
    n = PRESETS["mistral_7b_en"].parameter_count
    full_mem = E.estimate_memory(SEVEN_B, full, trainable=n, total=n)
    # bf16 weights + grads + two bf16 AdamW moments = 8 bytes per parameter
    assert full_mem.terms["trainable + grads + optimizer"][0] == 8 * n
    assert E.fits(full_mem.peak_bytes, "H100") and not E.fits(full_mem.peak_bytes, "L4")


def test_lora_count_matches_peft_on_the_meta_device():
    from mistral_tune.config.schema import AdapterConfig
    from mistral_tune.pipeline.dry_run import build_on_meta

    for config, targets, r in ((TINY, ["q_proj", "v_proj"], 8), (SEVEN_B, ["all-linear"], 16)):
        adapter = AdapterConfig(name="lora", r=r, target_modules=targets)
        model = build_on_meta(config, adapter)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == E.lora_parameter_count(config, E.RunShape(target_modules=tuple(targets)).targets, r)
        assert next(model.parameters()).device.type == "meta"


def test_speed_scales_with_gpu_peak_and_tokens():
    _, shape, trainable = anchor()
    h100 = E.estimate_speed(SEVEN_B, shape, trainable=trainable, gpu="H100", mfu=0.4)
    a100 = E.estimate_speed(SEVEN_B, shape, trainable=trainable, gpu="A100", mfu=0.4)
    assert a100.step_seconds / h100.step_seconds == pytest.approx(989.4 / 312.0)
    # Forward + input-grad backward + recomputation of a 7.1B-matmul model: ~6 x 7.1 GFLOPs/token + attention
    assert 40e9 < h100.flops_per_token < 50e9
    assert h100.tokens_per_second == pytest.approx(2048 / h100.step_seconds)
    assert E.mean_context(2048, 4096) == pytest.approx(1024.5) and E.mean_context(8192, 4096) < 4096


MIXTRAL = PRESETS["mixtral_8x7b_en"].config


def test_moe_memory_counts_every_expert_and_flops_only_the_active_ones():
    from mistral_tune.models.presets import parameter_count

    shape = E.RunShape(batch_size=1, seq_len=2048, adapter="lora", gradient_checkpointing=True)
    more_experts = {**MIXTRAL, "num_local_experts": 16}
    more_active = {**MIXTRAL, "num_experts_per_tok": 4}
    one_expert = 3 * 4096 * 14336 * 32  # gate, up, down of one expert in each of the 32 layers

    def weights(c):
        n = parameter_count(c)
        return E.estimate_memory(c, shape, trainable=0, total=n).terms["weights"][0]

    # weights: all 8 (or 16) experts are resident, in bf16 here
    assert weights(more_experts) - weights(MIXTRAL) == 2 * (8 * one_expert + 8 * 4096 * 32)
    assert weights(more_active) == weights(MIXTRAL)
    # FLOPs: only the 2 routed experts compute; more experts on the shelf only widen the router
    f = E.flops_per_token(MIXTRAL, shape, trainable=0)
    assert E.flops_per_token(more_experts, shape, trainable=0) - f == pytest.approx(6 * 8 * 4096 * 32)
    assert E.flops_per_token(more_active, shape, trainable=0) - f == pytest.approx(6 * 2 * one_expert)
    # forward 2 + input-grad backward 2 + recompute 2 FLOPs per active matmul weight: ~12.9B active
    active = parameter_count(MIXTRAL, active=True) - 2 * 32000 * 4096 + 32000 * 4096  # no embedding matmul
    assert f == pytest.approx(6 * active, rel=0.05)


def test_moe_qlora_stores_experts_in_nf4_unless_lora_targets_them():
    """bitsandbytes quantizes nn.Linear (attention here); mistral-tune quantizes the experts (3D parameters) too,
    except when LoRA is on them: then they stay and are upcast to fp32."""
    shape = E.RunShape(batch_size=1, seq_len=2048, adapter="qlora", target_modules=("all-linear",), lora_r=16)
    n = PRESETS["mixtral_8x7b_en"].parameter_count
    attention = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2)  # q, o, k, v
    experts = 32 * 8 * 3 * 4096 * 14336
    assert E.expert_parameter_count(MIXTRAL) == experts and E.expert_parameter_count(SEVEN_B) == 0
    weights = E.estimate_memory(MIXTRAL, shape, trainable=0, total=n).terms["weights"][0]
    quantized = attention + experts
    assert weights == int(quantized * E.NF4_BITS_PER_PARAM / 8 + (n - quantized) * 4)
    assert weights / E.GiB == pytest.approx(23.29, abs=0.01)  # was 172 GiB with the experts in fp32
    assert E.lora_parameter_count(MIXTRAL, shape.targets, 16) == 32 * 16 * (8192 + 5120 * 2 + 8192)
    on_experts = E.RunShape(**{**shape.__dict__, "target_modules": ("q_proj", "experts.down_proj")})
    assert not E.experts_in_4bit(MIXTRAL, on_experts) and E.experts_in_4bit(MIXTRAL, shape)
    weights = E.estimate_memory(MIXTRAL, on_experts, trainable=0, total=n).terms["weights"][0]
    assert weights == int(attention * E.NF4_BITS_PER_PARAM / 8 + (n - attention) * 4)


def test_ministral_attention_flops_follow_its_layer_pattern():
    c = PRESETS["ministral_instruct_8b_en"].config
    assert E.layer_windows(c)[:4] == [0, 32768, 32768, 32768]
    short = {**c, "sliding_window": 1024}
    s = E.RunShape(seq_len=8192)
    # 9 full-attention layers keep their full context, 27 sliding ones are capped at the window
    assert E.flops_per_token(short, s, 0) < E.flops_per_token(c, s, 0)
    all_sliding = {**short, "layer_types": ["sliding_attention"] * 36}
    assert E.flops_per_token(all_sliding, s, 0) < E.flops_per_token(short, s, 0)


MOE_TINY = dict(
    vocab_size=1000, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256, sliding_window=None,
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("experts_4bit", [True, False])
def test_mixtral_qlora_layer_activations_match_saved_tensors(tmp_path, experts_4bit):
    """A Mixtral layer under QLoRA, experts in NF4 (adapters/experts4bit.py) or left 16-bit (LoRA on them):
    what autograd keeps per token, against the estimate. With 4-bit experts no dense expert weight is kept
    (bitsandbytes' matmul dequantizes again in backward), only each active expert's gathered input."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, MixtralConfig, MixtralForCausalLM

    from mistral_tune.adapters.experts4bit import quantize_experts

    def build(layers):
        torch.manual_seed(0)
        MixtralForCausalLM(MixtralConfig(**MOE_TINY, num_hidden_layers=layers)).save_pretrained(tmp_path / str(layers))
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = AutoModelForCausalLM.from_pretrained(
            tmp_path / str(layers), dtype=torch.float32, attn_implementation="sdpa", quantization_config=quant
        )
        if experts_4bit:
            assert quantize_experts(model) == layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        return get_peft_model(model, lora).train()

    seq = 128
    ids = torch.randint(3, 1000, (1, seq), generator=torch.Generator().manual_seed(1))
    measured = (saved_bytes(build(3), ids) - saved_bytes(build(2), ids)) / seq
    targets = ("q_proj", "v_proj") if experts_4bit else ("q_proj", "v_proj", "experts.down_proj")
    shape = E.RunShape(
        seq_len=seq, adapter="qlora", target_modules=targets, compute_bytes=4, attn="sdpa", dropout_mask_bytes=4
    )
    terms = E.layer_activation_terms({**MOE_TINY, "num_hidden_layers": 2}, shape)
    assert ("4-bit experts (gathered inputs)" in terms) == experts_4bit
    # routing is uneven per expert, so the MoE terms are approximate (the dense terms are exact above)
    assert sum(terms.values()) == pytest.approx(measured, rel=0.05), (measured, terms)


def test_mixtral_qlora_weights_estimate_matches_the_loaded_4bit_model():
    """The weights term against the bytes the QLoRA-loaded mixtral_tiny really holds (packed NF4 weights,
    their absmax statistics, and the fp32 rest after PEFT's k-bit preparation)."""
    import mistral_tune.models.loading as models
    from mistral_tune.adapters.build import apply_adapter, count_parameters
    from mistral_tune.adapters.quantization import quantization_config
    from mistral_tune.compat.bitsandbytes import is_params4bit
    from mistral_tune.config.compose import compose
    from mistral_tune.models.sources import resolve_source

    pytest.importorskip("bitsandbytes")
    cfg = compose("sft_qlora", ["model=mixtral_tiny"])
    quant = quantization_config(cfg.adapter, torch.float32)
    model = models.load_model(cfg.model, resolve_source("mixtral_tiny"), seed=42, quantization_config=quant)
    model = apply_adapter(model, cfg.adapter)
    held = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        held += p.numel() * p.element_size()
        if is_params4bit(p):
            state = p.quant_state
            held += state.absmax.numel() * state.absmax.element_size()
            held += state.state2.absmax.numel() * state.state2.absmax.element_size()
    trainable, total = count_parameters(model)
    shape = E.RunShape(adapter="qlora", target_modules=tuple(cfg.adapter.target_modules), lora_r=cfg.adapter.r)
    c = PRESETS["mixtral_tiny"].config
    estimated = E.estimate_memory(c, shape, trainable=trainable, total=total).terms["weights"][0]
    assert estimated == pytest.approx(held, rel=0.01), (estimated, held)
