"""Each adapter kind trains on mistral_tiny, and its merged export reproduces the fine-tuned model.

One short run per kind (lora, qlora, dora, none) is shared by every test in this module. Each run
trains a few steps on the same tiny batch, so the loss must fall; the merged checkpoint is then
checked against references rebuilt independently of mistral_tune's export code.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from mistral_tune import cli
from mistral_tune.config.compose import compose
from mistral_tune.core.errors import UserError
from mistral_tune.models.presets import PRESETS
from tests.helpers import read_summary as summary

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


RECIPES = {"lora": "sft_lora", "qlora": "sft_qlora", "dora": "sft_dora", "none": "sft_full"}


# Same 2 examples every step (max_samples = batch size): the loss on them must fall within 3 steps.
SHORT = [
    "train.max_steps=3",
    "train.per_device_train_batch_size=2",
    "data.max_samples=2",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "trainer.max_length=48",
    "export.num_samples=1",
    "export.sample_max_new_tokens=4",
]


EXTRA = {"lora": ["export=preset"]}  # the LoRA run also writes preset/


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train each kind at most once per module; returns a getter kind -> run directory."""
    from mistral_tune.pipeline.run import run

    root, done = tmp_path_factory.mktemp("adapters"), {}

    def get(kind):
        if kind not in done:
            out = root / kind
            run(compose(RECIPES[kind], SHORT + EXTRA.get(kind, []) + [f"output_dir={out}"]))
            done[kind] = out
        return done[kind]

    return get


TINY_PARAMS = PRESETS["mistral_tiny"].parameter_count


TEXT = "The opposite of hot is cold. " * 8  # longer than the tiny preset's sliding window (32)


def base_model(quantized=False):
    """The run's base, rebuilt from preset + seed (the recipes' train.seed is 42)."""
    import mistral_tune.models.loading as models
    from mistral_tune.adapters.quantization import quantization_config
    from mistral_tune.models.sources import resolve_source

    cfg = compose("sft_qlora" if quantized else "sft_lora", [])
    quant = quantization_config(cfg.adapter, torch.float32) if quantized else None
    return models.load_model(cfg.model, resolve_source("mistral_tiny"), seed=42, quantization_config=quant)


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def ids():
    from mistral_tune.models.sources import resolve_source
    from mistral_tune.models.tokenizer import load_tokenizer

    return torch.tensor([load_tokenizer(resolve_source("mistral_tiny")).encode(TEXT)])


@pytest.mark.parametrize("kind", list(RECIPES))
def test_loss_falls(runs, kind):
    losses = [json.loads(line)["loss"] for line in (runs(kind) / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3
    assert losses[-1] < losses[0] - 0.1, f"{kind}: {losses}"


@pytest.mark.parametrize("kind", list(RECIPES))
def test_trainable_and_total_parameters_logged(runs, kind):
    run_dir = runs(kind)
    p = summary(run_dir)["parameters"]
    expected_trainable = {
        "lora": 2 * 8 * ((256 + 256) + (256 + 128)),  # 2 layers, r=8: q (256->256), v (256->128)
        # r=16 on all 7 linears per layer: q, o (256x256), k, v (256->128), gate, up, down (256<->768)
        "qlora": 2 * 16 * (2 * 512 + 2 * 384 + 3 * 1024),
        "dora": 2 * (8 * ((256 + 256) + (256 + 128)) + 256 + 128),  # + one magnitude per output row
        "none": TINY_PARAMS,
    }[kind]
    assert p["trainable"] == expected_trainable
    # 4-bit weights count as the matrices they encode, so the base is the same size for every kind
    assert p["total"] == TINY_PARAMS + (0 if kind == "none" else expected_trainable)
    log = (run_dir / "train.log").read_text()
    assert (
        f"parameters: {p['trainable']:,} trainable of {p['total']:,} ({100 * p['trainable'] / p['total']:.3f}%)" in log
    )


def test_qlora_base_was_nf4_double_quantized_in_fp32_compute(runs):
    side = json.loads((runs("qlora") / "adapter" / "mistral_tune_adapter.json").read_text())
    q = side["quantization"]
    assert (q["quant_type"], q["double_quant"], q["base_dtype"]) == ("nf4", True, "float32")
    assert len(q["modules"]) == 14 and "lm_head" not in q["modules"]  # 7 linears x 2 layers; head stays full
    # adapter weights stay fp32 with fp32 compute (TRL would have cast them to bf16)
    adapter = load_file(runs("qlora") / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_matches_base_plus_adapter(runs, kind, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = runs(kind)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    reference = PeftModel.from_pretrained(base_model(), run_dir / "adapter")
    got, want = logits(merged, ids), logits(reference, ids)
    assert (got - want).abs().max() < 1e-4
    assert (want - logits(base_model(), ids)).abs().max() > 1e-3, "the fine-tune is in the merged model"
    assert summary(run_dir)["merged"]["max_abs_logit_diff"] < 1e-4


def test_qlora_merged_matches_dequantized_base_plus_adapter(runs, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = runs("qlora")
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    # transformers' own dequantization of the 4-bit base, independent of mistral_tune.export
    dequantized = base_model(quantized=True).dequantize()
    reference = PeftModel.from_pretrained(dequantized, run_dir / "adapter")
    got, want = logits(merged, ids), logits(reference, ids)
    assert (got - want).abs().max() < 1e-4
    # ... and not the original fp32 base: the merge used what the adapter was trained against
    plain = PeftModel.from_pretrained(base_model(), run_dir / "adapter")
    assert (got - logits(plain, ids)).abs().max() > 1e-3
    s = summary(run_dir)["merged"]
    assert s["reference"] == "dequantized 4-bit base + adapter" and s["max_abs_logit_diff"] < 1e-4
    assert s["dequantized_vs_4bit_max_abs_logit_diff"] < 1e-4  # the 4-bit model computes the same on CPU


def test_full_fine_tune_merged_is_the_trained_model(runs, ids):
    from transformers import AutoModelForCausalLM

    run_dir = runs("none")
    assert not (run_dir / "adapter").exists()
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    assert (logits(merged, ids) - logits(base_model(), ids)).abs().max() > 1e-2
    assert summary(run_dir)["merged"]["max_abs_logit_diff"] == 0.0  # same fp32 weights, reloaded


@pytest.mark.parametrize("kind", list(RECIPES))
def test_streamed_merge_equals_in_memory_merge(runs, kind, tmp_path):
    run_dir = runs(kind)
    if kind == "none":  # no adapter: the streamed path re-shards the fine-tuned model itself
        args = [f"run_dir={run_dir}", "formats=[preset]"]
        out = run_dir / "preset"
    else:
        out = tmp_path / "streamed"
        args = [f"adapter={run_dir / 'adapter'}", "base=mistral_tiny", "seed=42", f"out={out}"]
        # the tensors are compared below; the command's own verification runs for QLoRA (its costliest path)
        args += [] if kind == "qlora" else ["verify=false"]
    assert cli.main(["export", *args]) == 0
    in_memory = load_file(run_dir / "merged" / "model.safetensors")
    streamed = load_file(out / "model.safetensors")
    assert in_memory.keys() == streamed.keys()
    worst = max((in_memory[k] - streamed[k]).abs().max().item() for k in in_memory)
    assert worst <= 1e-6, f"{kind}: streamed and in-memory merges differ by {worst}"


def test_merged_and_preset_in_one_export_share_one_verified_merge(runs, tmp_path):
    out = tmp_path / "both"
    args = [f"adapter={runs('lora') / 'adapter'}", "base=mistral_tiny", f"out={out}", "formats=[merged,preset]"]
    assert cli.main(["export", *args]) == 0
    merged, preset = (out / "merged"), (out / "preset")
    assert (merged / "model.safetensors").read_bytes() == (preset / "model.safetensors").read_bytes()
    assert (preset / "metadata.json").is_file() and not (merged / "metadata.json").exists()
    assert (merged / "tokenizer.json").is_file() and (preset / "tokenizer.json").is_file()
    in_memory = load_file(runs("lora") / "merged" / "model.safetensors")
    streamed = load_file(preset / "model.safetensors")
    assert max((in_memory[k] - streamed[k]).abs().max().item() for k in in_memory) <= 1e-6


def test_exported_config_keeps_sliding_window_rope_and_chat_template(runs):
    from transformers import AutoConfig, AutoTokenizer

    from mistral_tune.models.tokenizer import MistralTokenizer

    merged = runs("lora") / "merged"
    config = AutoConfig.from_pretrained(merged)
    assert config.sliding_window == 32 and config.rope_parameters["rope_theta"] == 10000.0
    assert config.use_cache is True  # training turned it off; inference wants it
    tok = MistralTokenizer.from_pretrained(merged)
    hf_tok = AutoTokenizer.from_pretrained(merged)
    assert hf_tok.chat_template == tok.jinja_chat_template
    assert json.loads((merged / "tokenizer_config.json").read_text())["chat_template"] == tok.jinja_chat_template
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    hf_ids = hf_tok.apply_chat_template(chat, tokenize=True)["input_ids"]
    assert hf_ids == tok.apply_chat_template(chat, add_generation_prompt=False)
    gen = json.loads((merged / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2) and gen["pad_token_id"] != 2


def test_preset_round_trips(runs, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    from mistral_tune.export.preset import write_preset
    from mistral_tune.models.tokenizer import MistralTokenizer

    run_dir = runs("lora")
    preset = run_dir / "preset"
    meta = json.loads((preset / "metadata.json").read_text())
    assert meta["parameter_count"] == TINY_PARAMS and meta["base_preset"] == "mistral_tiny"
    assert meta["provenance"]["recipe"] == "sft_lora" and meta["provenance"]["adapter"]["r"] == 8
    assert {"mistral_tune_version", "date_saved", "tasks"} <= meta.keys()
    assert summary(run_dir)["preset"]["max_abs_logit_diff"] < 1e-4
    model = AutoModelForCausalLM.from_pretrained(preset, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32)
    assert torch.equal(logits(model, ids), logits(merged, ids))
    # ... and through the Python API, which reads metadata.json
    from mistral_tune import MistralCausalLM

    lm = MistralCausalLM.from_preset(str(preset), dtype="float32")
    assert lm.metadata["provenance"]["recipe"] == "sft_lora" and lm.base_preset == "mistral_tiny"
    assert torch.equal(logits(lm.hf_model, ids), logits(merged, ids))
    # write_preset -> from_pretrained gives the same model back, with the provenance we passed
    again = write_preset(
        model, MistralTokenizer.from_pretrained(preset), tmp_path / "p", base_preset="mine", provenance={"k": 1}
    )
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(again), ids), logits(model, ids))
    meta2 = json.loads((again / "metadata.json").read_text())
    assert meta2["provenance"] == {"k": 1} and meta2["base_preset"] == "mine"
    assert MistralTokenizer.from_pretrained(again).encode(TEXT) == ids[0].tolist()


def test_paged_optimizer_on_cpu_is_one_clear_error(tmp_path):
    from mistral_tune.pipeline.run import run

    if torch.cuda.is_available():
        pytest.skip("paged optimizers are fine with CUDA")
    cfg = compose("sft_qlora", ["train.optim=paged_adamw_8bit", f"output_dir={tmp_path / 'r'}"])
    with pytest.raises(UserError, match="paged_adamw_8bit.*no CUDA GPU.*adamw_8bit"):
        run(cfg)


def test_resume_from_continues_the_adapter_and_export_none_publishes_a_card(runs, tmp_path):
    from mistral_tune.pipeline.run import run

    first = runs("lora")
    out = tmp_path / "resumed"
    overrides = SHORT + [
        f"adapter.resume_from={first / 'adapter'}",
        "train.max_steps=1",
        "train.learning_rate=1e-9",
        "export=none",
        f"output_dir={out}",
    ]
    s = run(compose("sft_lora", overrides))
    before = load_file(first / "adapter" / "adapter_model.safetensors")
    after = load_file(out / "adapter" / "adapter_model.safetensors")
    b_key = next(k for k in before if "lora_B" in k)
    assert before[b_key].abs().max() > 0  # a fresh adapter would start from B = 0
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5
    assert s["first_loss"] < summary(first)["first_loss"] - 0.1  # starts where the first run ended
    # export=none: no merged weights, a model card with base, recipe, data and metrics
    assert not (out / "merged").exists() and s["merged"] is None
    card = (out / "adapter" / "README.md").read_text()
    for needle in ("base_model: mistral_tiny", "recipe `sft_lora`", "data/sft_sample.jsonl", "loss: first"):
        assert needle in card
    assert "base=mistral_tiny out=merged seed=42" in card  # the random base's seed goes with the merge command


def test_mixtral_adapter_targets():
    """all-linear on a MoE model is attention only; the experts are opt-in by name, without dropout."""
    from mistral_tune.adapters.build import lora_config, split_targets
    from mistral_tune.config.schema import AdapterConfig
    from mistral_tune.core.errors import UserError

    assert split_targets(["all-linear"]) == ("all-linear", [])
    assert split_targets(["all-linear"], moe=True) == (["q_proj", "k_proj", "v_proj", "o_proj"], [])
    assert split_targets(["q_proj", "v_proj", "experts.down_proj"], moe=True) == (
        ["q_proj", "v_proj"],
        ["experts.down_proj"],
    )
    with pytest.raises(UserError, match="list it alone"):
        split_targets(["all-linear", "q_proj"])
    experts = AdapterConfig(target_modules=["q_proj", "experts.gate_up_proj"], lora_dropout=0.05)
    with pytest.raises(UserError, match="adapter.lora_dropout=0"):
        lora_config(experts, moe=True)
    experts.lora_dropout = 0.0
    config = lora_config(experts, moe=True)
    assert set(config.target_modules) == {"q_proj"} and config.target_parameters == ["experts.gate_up_proj"]


def test_lora_on_mixtral_experts_trains_only_the_adapter():
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_tune.adapters.build import apply_adapter, count_parameters
    from mistral_tune.config.schema import AdapterConfig
    from mistral_tune.models.loading import preset_config
    from mistral_tune.models.presets import PRESETS

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(PRESETS["mixtral_tiny"]))
    targets = ["q_proj", "v_proj", "experts.gate_up_proj", "experts.down_proj"]
    peft_model = apply_adapter(model, AdapterConfig(r=4, target_modules=targets, lora_dropout=0.0))
    trainable, total = count_parameters(peft_model)
    c = PRESETS["mixtral_tiny"].config
    h, i, experts, layers = c["hidden_size"], c["intermediate_size"], c["num_local_experts"], c["num_hidden_layers"]
    q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    per_layer = 4 * ((h + q) + (h + kv)) + 4 * experts * ((h + 2 * i) + (i + h))  # r * (in + out), per expert
    assert trainable == layers * per_layer
    assert total == PRESETS["mixtral_tiny"].parameter_count + trainable


# -- QLoRA on Mixtral: the experts in NF4 -----------------------------------------------------------------


def mixtral_tiny_4bit():
    """mixtral_tiny (seed 42) loaded as QLoRA loads it: bitsandbytes NF4 for the linear layers, fp32 compute."""
    import mistral_tune.models.loading as models
    from mistral_tune.adapters.quantization import quantization_config
    from mistral_tune.models.sources import resolve_source

    cfg = compose("sft_qlora", ["model=mixtral_tiny"])
    quant = quantization_config(cfg.adapter, torch.float32)
    return models.load_model(cfg.model, resolve_source("mixtral_tiny"), seed=42, quantization_config=quant), cfg


def test_qlora_stores_mixtral_experts_in_nf4_and_computes_as_the_dequantized_weights():
    """The forward with 4-bit experts equals transformers' own MixtralExperts on the dequantized weights,
    inputs' gradients too; nothing of the experts is left in 16/32-bit after PEFT's k-bit preparation."""
    from mistral_tune.adapters.build import apply_adapter, count_parameters
    from mistral_tune.adapters.experts4bit import Experts4bit
    from mistral_tune.compat.transformers import experts_modules
    from mistral_tune.export.merged import dequantized_copy

    model, cfg = mixtral_tiny_4bit()
    c = PRESETS["mixtral_tiny"].config
    assert len(experts_modules(model)) == c["num_hidden_layers"]  # bitsandbytes left them as 3D fp32 parameters
    peft_model = apply_adapter(model, cfg.adapter)
    assert experts_modules(peft_model) == []
    experts = [m for m in peft_model.modules() if isinstance(m, Experts4bit)]
    assert len(experts) == c["num_hidden_layers"]
    for module in experts:
        for p in module.parameters():
            assert p.dtype == torch.uint8 and not p.requires_grad and p.quant_state.quant_type == "nf4"
            assert p.quant_state.nested  # double quantization, as the linear layers
    # 4 bits per weight: each expert's gate, up and down (64 x 128 each) pack into 4096 bytes
    assert sum(p.numel() for p in experts[0].parameters()) == c["num_local_experts"] * 3 * 64 * 128 // 2
    assert not [n for n, p in peft_model.named_parameters() if p.ndim == 3]
    trainable, total = count_parameters(peft_model)
    assert total == PRESETS["mixtral_tiny"].parameter_count + trainable  # 4-bit weights count what they encode

    # one layer's experts against transformers' module holding the dequantized weights
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    reference = MixtralExperts(peft_model.get_base_model().config)
    for name, value in experts[0].dequantized().items():
        setattr(reference, name, torch.nn.Parameter(value, requires_grad=False))
    torch.manual_seed(0)
    x = torch.randn(40, 64, requires_grad=True)
    top_k = torch.stack([torch.randperm(4)[:2] for _ in range(40)])
    weights = torch.rand(40, 2)
    ours = experts[0](x, top_k, weights)
    ours.square().sum().backward()
    grad, x.grad = x.grad.clone(), None
    theirs = reference(x, top_k, weights)
    theirs.square().sum().backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=0, atol=1e-6)
    assert ours.abs().max() > 0.01  # not a vacuous match

    # the whole model: 4-bit logits equal the dequantized copy's (the export's reference)
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = dequantized_copy(peft_model, torch.float32)
    assert not [m for m in plain.modules() if isinstance(m, Experts4bit)]
    torch.testing.assert_close(logits(peft_model, ids), logits(plain, ids), rtol=0, atol=1e-5)


def test_qlora_record_lists_each_experts_checkpoint_tensors(tmp_path):
    """The sidecar's record names each expert's w1/w3/w2, so the streamed merge rounds each through NF4
    exactly as the run stored it: merged base tensors equal the 4-bit experts dequantized, bit for bit."""
    import mistral_tune.models.loading as models
    from mistral_tune.adapters.build import apply_adapter
    from mistral_tune.adapters.experts4bit import Experts4bit
    from mistral_tune.adapters.quantization import experts_were_4bit, quantization_record
    from mistral_tune.export.stream_merge import stream_merge
    from mistral_tune.models.sources import resolve_source

    base_dir = tmp_path / "base"
    plain = models.load_model(
        compose("sft_lora", ["model=mixtral_tiny"]).model, resolve_source("mixtral_tiny"), seed=42
    )
    plain.save_pretrained(base_dir)  # the hub's layout: one w1/w2/w3 tensor per expert
    model, cfg = mixtral_tiny_4bit()
    peft_model = apply_adapter(model, cfg.adapter)
    record = quantization_record(peft_model)
    assert experts_were_4bit(record)
    experts_names = [n for n in record["modules"] if ".experts." in n]
    assert len(experts_names) == 2 * 4 * 3 and "model.layers.1.block_sparse_moe.experts.3.w3" in experts_names
    stream_merge(base_dir, None, tmp_path / "out", quantization=record)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(base_dir / "model.safetensors")
    layer0 = peft_model.get_base_model().model.layers[0].mlp.experts
    assert isinstance(layer0, Experts4bit)
    for e in range(4):
        for proj, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            key = f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"
            assert torch.equal(merged[key], layer0.weight(proj, e)), key
            assert not torch.equal(merged[key], original[key])  # the NF4 round trip did happen


def test_qlora_with_lora_on_the_experts_keeps_them_16bit(caplog):
    """PEFT's LoRA on parameters needs the experts as parameters: then they stay (one warning says so)."""
    from mistral_tune.adapters.build import apply_adapter
    from mistral_tune.adapters.experts4bit import Experts4bit

    model, cfg = mixtral_tiny_4bit()
    cfg.adapter.target_modules = ["q_proj", "experts.down_proj"]
    cfg.adapter.lora_dropout = 0.0
    with caplog.at_level("WARNING"):
        peft_model = apply_adapter(model, cfg.adapter)
    assert "the experts stay in 16-bit" in caplog.text
    assert not [m for m in peft_model.modules() if isinstance(m, Experts4bit)]
    expert_lora = [n for n, p in peft_model.named_parameters() if ".experts." in n and "lora_" in n]
    assert expert_lora and all(p.requires_grad for n, p in peft_model.named_parameters() if n in expert_lora)
