"""Export machinery without training: streamed merge math, sharding, atomicity, QLoRA round trip, config checks.

A small Mistral (hidden 64, 2 layers, real 32000-piece vocabulary) with random adapters stands in for
a trained run, so each test takes seconds.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import mistral_tune.export.pipeline as export
import mistral_tune.export.stream_merge as merge
from mistral_tune import cli
from mistral_tune.core.errors import UserError
from mistral_tune.core.files import OWNER_MARKER
from mistral_tune.export.verify import ExportMismatch, reference_logits
from tests.helpers import SMALL_CONFIG as SMALL
from tests.helpers import small_base

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tokenizer(plain_tokenizer):
    return plain_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """The small base on disk in several shards (its embedding alone is 8 MB in fp32)."""
    out = tmp_path_factory.mktemp("base")
    small_base().save_pretrained(out, max_shard_size="5MB")
    tokenizer.save_pretrained(out)
    return out


def trained_adapter(out_dir, seed=1, **lora_kwargs):
    """A LoRA/DoRA adapter with random (non-zero) weights, saved to ``out_dir``; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(small_base(), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out_dir)
    return model.eval()


def streamed_state(out_dir):
    state = {}
    for shard in merge.base_shards(out_dir):
        state.update(load_file(shard))
    return state


ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "lora_rslora_patterns_modules_to_save": dict(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules="all-linear",
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 4},
        modules_to_save=["lm_head"],
    ),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True),
}


PROMPTS = ("The capital of France is", "Sliding windows keep attention local. " * 3)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_streamed_merge_equals_peft_merge(kind, base_dir, tmp_path):
    model = trained_adapter(tmp_path / "adapter", **ADAPTERS[kind])
    in_memory = model.merge_and_unload().state_dict()
    info = merge.stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", max_shard_size="3MB")
    streamed = streamed_state(tmp_path / "out")
    assert in_memory.keys() == streamed.keys()
    worst = max((in_memory[k] - streamed[k]).abs().max().item() for k in in_memory)
    assert worst < 1e-6, worst
    assert len(info["shards"]) > 1 and info["dtype"] == "float32"


def test_shards_respect_the_limit_and_load_in_transformers(base_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = trained_adapter(tmp_path / "adapter", **ADAPTERS["lora"])
    expected = reference_logits(model, tokenizer, PROMPTS)
    merge.stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out", max_shard_size="3MB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    for name in files:  # the 8 MB embedding and head are single tensors over the limit; others fit
        tensors = load_file(tmp_path / "out" / name)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 3_000_000 or len(tensors) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert (reference_logits(reloaded, tokenizer, PROMPTS) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_export_within_tolerance_and_measured(dtype, base_dir, tmp_path, tokenizer):
    out = tmp_path / "out"
    trained_adapter(tmp_path / "adapter", **ADAPTERS["lora"])
    args = [f"adapter={tmp_path / 'adapter'}", f"base={base_dir}", f"out={out}", f"dtype={dtype}"]
    assert cli.main(["export", *args]) == 0
    assert {t.dtype for t in streamed_state(out).values()} == {getattr(torch, dtype)}
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_failed_verification_keeps_nothing_and_spares_the_previous_export(tmp_path, tokenizer):
    model = trained_adapter(tmp_path / "adapter", **ADAPTERS["lora"])
    out = tmp_path / "merged"
    out.mkdir()
    (out / "marker").write_text("previous export")
    (out / OWNER_MARKER).write_text("")  # an export mistral-tune wrote, so one it may replace
    with pytest.raises(ExportMismatch, match="does not reproduce"):
        # bf16 rounding makes the difference > 0, so a 1e-9 tolerance must fail after writing everything
        export.export_model(model, tokenizer, prompts=PROMPTS, dtype_name="bfloat16", merged_dir=out, tolerance=1e-9)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNER_MARKER, "marker"])


def test_in_memory_export_records_diff_and_writes_both_formats(tmp_path, tokenizer):
    model = trained_adapter(tmp_path / "adapter", **ADAPTERS["dora"])
    info = export.export_model(
        model,
        tokenizer,
        prompts=PROMPTS,
        merged_dir=tmp_path / "merged",
        preset_dir=tmp_path / "preset",
        max_shard_size="5MB",
        base_preset="small",
        provenance={"test": True},
    )
    for kind in ("merged", "preset"):
        assert info[kind]["dtype"] == "float32" and 0 <= info[kind]["max_abs_logit_diff"] < 1e-4
        assert (tmp_path / kind / "model.safetensors.index.json").exists()
    meta = json.loads((tmp_path / "preset" / "metadata.json").read_text())
    assert meta["provenance"] == {"test": True} and meta["parameter_count"] == sum(
        p.numel() for p in small_base().parameters()
    )


def test_streamed_merge_failing_half_way_leaves_no_directory(base_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "base"
    shutil.copytree(base_dir, broken)
    shards = merge.base_shards(broken)
    with open(shards[1], "r+b") as f:  # the first shard merges fine, the second is cut short
        f.truncate(f.seek(0, 2) // 2)
    trained_adapter(tmp_path / "adapter", **ADAPTERS["lora"])
    out = tmp_path / "out"
    code = cli.main(
        [
            "export",
            f"adapter={tmp_path / 'adapter'}",
            f"base={broken}",
            f"out={out}",
            "verify=false",
            "max_shard_size=1MB",
        ]
    )
    assert code != 0
    # one clear error, found from the headers before any tensor is merged
    assert "is truncated" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_adapter_for_another_base_is_refused(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    bigger = MistralForCausalLM(MistralConfig(**{**SMALL, "num_hidden_layers": 3}))
    get_peft_model(bigger, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(UserError, match="was not trained on"):
        merge.stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out")


def test_unconverted_pissa_adapter_is_refused(base_dir, tmp_path):
    trained_adapter(tmp_path / "adapter", r=2, target_modules=["q_proj"], init_lora_weights="pissa")
    with pytest.raises(UserError, match="rewrote the base"):
        merge.stream_merge(base_dir, tmp_path / "adapter", tmp_path / "out")


def test_pissa_adapter_is_saved_for_the_original_base(tmp_path, tokenizer):
    from peft import PeftModel

    import mistral_tune.adapters.build as adapters
    from mistral_tune.config.schema import AdapterConfig

    cfg = AdapterConfig(
        name="lora", r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"
    )
    model = adapters.apply_adapter(small_base(), cfg, init_dir=tmp_path / "init")
    with torch.no_grad():  # stand-in for training
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    trained = reference_logits(model, tokenizer, PROMPTS)
    adapters.save_adapter(model, tmp_path / "adapter", base={"name": "small"}, kind="lora", init_dir=tmp_path / "init")
    assert not (tmp_path / "init").exists()
    reloaded = PeftModel.from_pretrained(small_base(), tmp_path / "adapter")  # the original, un-rewritten base
    assert (reference_logits(reloaded, tokenizer, PROMPTS) - trained).abs().max() < 1e-4


def test_nf4_round_trip_reproduces_transformers_4bit_loading(base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mistral_tune.adapters.quantization import keep_cpu_4bit_numerics, quantization_record

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=bnb)
    keep_cpu_4bit_numerics(quantized)
    record = quantization_record(quantized)
    assert record["blocksize"] == 64 and len(record["modules"]) == 14
    original = small_base().state_dict()
    dequantized = quantized.dequantize().state_dict()
    for module in record["modules"]:
        key = module + ".weight"
        assert torch.equal(merge.nf4_round_trip(original[key], record), dequantized[key]), key


def test_count_parameters_of_a_4bit_model_is_the_full_size(base_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from mistral_tune.adapters.build import count_parameters

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, quantization_config=bnb)
    assert count_parameters(quantized)[1] == sum(p.numel() for p in small_base().parameters())


def test_parse_size():
    assert merge.parse_size("2GB") == 2 * 10**9 and merge.parse_size("500MiB") == 500 * 2**20
    with pytest.raises(UserError):
        merge.parse_size("lots")


def small_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        **{k: v for k, v in SMALL.items() if k != "sliding_window"}, num_local_experts=3, num_experts_per_tok=2
    )
    return MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("targets", [["experts.gate_up_proj"], ["q_proj", "experts.gate_up_proj", "experts.down_proj"]])
def test_streamed_merge_folds_lora_on_mixtral_experts_into_each_expert(targets, tmp_path, tokenizer):
    """LoRA on Mixtral's fused 3D experts (PEFT target_parameters) lands in the checkpoint's per-expert
    w1/w3/w2 tensors; the merged model reloads in transformers with the adapted model's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mistral_tune.adapters.build import split_targets

    small_mixtral().save_pretrained(tmp_path / "base")
    assert any(".block_sparse_moe.experts.0.w1." in k for k in load_file(tmp_path / "base" / "model.safetensors"))
    modules, params = split_targets(targets, moe=True)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=modules, target_parameters=params, lora_dropout=0.0,
                      init_lora_weights=False)  # fmt: skip
    adapted = get_peft_model(small_mixtral(), lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    merge.stream_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert merged.config.output_router_logits is False
    expected = reference_logits(adapted, tokenizer, PROMPTS)
    base = reference_logits(small_mixtral(), tokenizer, PROMPTS)
    got = reference_logits(merged, tokenizer, PROMPTS)
    assert (got - expected).abs().max() < 1e-4
    assert (expected - base).abs().max() > 100 * (got - expected).abs().max()  # the experts' delta was there


def test_expert_lora_needs_a_mixture_of_experts_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"], lora_dropout=0.0)
    get_peft_model(small_mixtral(), lora).save_pretrained(tmp_path / "adapter")
    small_base().save_pretrained(tmp_path / "dense")
    with pytest.raises(UserError, match="not a mixture of experts"):
        merge.stream_merge(tmp_path / "dense", tmp_path / "adapter", tmp_path / "out")
