"""`mistral-tune eval`: lm-evaluation-harness on our offline tasks, checked against transformers."""

from __future__ import annotations

import json
import math
import re
import time

import pytest

from mistral_tune.core.errors import UserError
from mistral_tune.evaluation.tasks import LOCAL_TASKS, local_task, resolve_tasks

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny preset (seed 0) saved with its tokenizer, as a merged/ directory is."""
    from mistral_tune.export.hf_files import write_tokenizer_files
    from mistral_tune.models.tokenizer import MistralTokenizer
    from tests.export.test_gguf import save_tiny

    directory = save_tiny(tmp_path_factory.mktemp("merged"))
    write_tokenizer_files(MistralTokenizer.from_version("v1", chat_template="v1"), directory)
    return directory


def rows(name, n):
    path = local_task(name)["dataset_kwargs"]["data_files"]["test"]
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def sum_logprob(model, ids, start):
    """Sum of log p(ids[i] | ids[:i]) for i >= start."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(start, len(ids))))


def test_shipped_tasks_are_well_formed():
    mc, ppl = rows("mistral_tune_mc", 1000), rows("mistral_tune_ppl", 1000)
    assert len(mc) == 50 and all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in mc)
    assert len(ppl) == 20 and all(len(r["text"].split()) >= 20 for r in ppl)
    assert [kind for _, _, kind in resolve_tasks(list(LOCAL_TASKS))] == ["multiple_choice", "loglikelihood_rolling"]


def test_hub_tasks_fail_fast_offline():
    start = time.time()  # tests point HF_ENDPOINT at a closed local port: an offline hub
    with pytest.raises(UserError, match="hellaswag are not ours .* download their data from the Hugging Face hub"):
        resolve_tasks(["mistral_tune_mc", "hellaswag"])
    assert time.time() - start < 5


@pytest.mark.slow  # two lm-eval runs
def test_our_perplexity_equals_an_independent_transformers_computation(model_dir, tmp_path):
    """One BOS as context, every text token scored: word and byte perplexity from the summed log-probs."""
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_tune.evaluation.harness import evaluate
    from mistral_tune.models.tokenizer import MistralTokenizer

    n = 5
    got = evaluate(str(model_dir), ["mistral_tune_ppl"], limit=n)["tasks"]["mistral_tune_ppl"]
    tokenizer = MistralTokenizer.from_version("v1")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    docs = [r["text"] for r in rows("mistral_tune_ppl", n)]
    total = sum(sum_logprob(model, tokenizer.encode(d), 1) for d in docs)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["word_perplexity"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-total / nbytes), rel=1e-4)
    # With add_bos_token=True lm-eval would score a second BOS as text: a different number.
    from mistral_tune.evaluation.harness import run_lm_eval

    target = {"pretrained": model_dir, "peft": None, "tokenizer": model_dir}
    doubled = run_lm_eval(target, [local_task("mistral_tune_ppl")], add_bos_token=True, limit=n, batch_size=8)
    double_bos = sum(sum_logprob(model, [tokenizer.bos_id] + tokenizer.encode(d), 1) for d in docs)
    assert doubled["results"]["mistral_tune_ppl"]["word_perplexity,none"] == pytest.approx(
        math.exp(-double_bos / words), rel=1e-4
    )
    assert abs(double_bos - total) > 1.0


@pytest.mark.slow  # an lm-eval run
def test_multiple_choice_accuracy_equals_an_independent_transformers_computation(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from mistral_tune.evaluation.harness import evaluate
    from mistral_tune.models.tokenizer import MistralTokenizer

    n = 12
    got = evaluate(str(model_dir), ["mistral_tune_mc"], limit=n)["tasks"]["mistral_tune_mc"]
    tokenizer = MistralTokenizer.from_version("v1")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    for r in rows("mistral_tune_mc", n):
        context = f"Question: {r['question']}\nAnswer:"
        prefix = tokenizer.encode(context)
        scores = []
        for choice in r["choices"]:
            ids = tokenizer.encode(f"{context} {choice}")
            assert ids[: len(prefix)] == prefix
            scores.append(sum_logprob(model, ids, len(prefix)))
        correct += int(max(range(4), key=scores.__getitem__) == r["answer"])
    assert got["acc"] == pytest.approx(correct / n)
    assert got["sample_len"] == n


def test_eval_cli_refuses_a_missing_task_list_and_a_gguf(tmp_path):
    from mistral_tune.cli.eval import parse_args
    from mistral_tune.evaluation.harness import resolve_target

    with pytest.raises(UserError, match="needs tasks"):
        parse_args(["preset=runs/x"])
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError, match="Evaluating a GGUF is not supported"):
        resolve_target(str(tmp_path / "m.gguf"), tmp_path)


@pytest.mark.slow
def test_a_run_evaluates_its_adapter_at_the_end_and_the_command_writes_eval_results(tmp_path):
    from mistral_tune import cli
    from mistral_tune.config.compose import compose
    from mistral_tune.pipeline.run import run
    from tests.export.test_export_pipeline import SHORT

    run_dir = tmp_path / "run"
    summary = run(compose("sft_lora", [*SHORT, "export=none", "eval.tasks=[mistral_tune_mc,mistral_tune_ppl]",
                                       "eval.limit=4", f"output_dir={run_dir}"]))  # fmt: skip
    entry = summary["eval"]
    assert entry["model"].endswith("/adapter") and " + " in entry["model"]  # base + adapter, unmerged
    assert 0.0 <= entry["tasks"]["mistral_tune_mc"]["acc"] <= 1.0
    assert entry["tasks"]["mistral_tune_ppl"]["word_perplexity"] > 1.0
    saved = json.loads((run_dir / "eval" / "results.json").read_text())
    assert saved["tasks"] == entry["tasks"] and "lm_eval" in saved
    assert json.loads((run_dir / "summary.json").read_text())["eval"]["tasks"] == entry["tasks"]
    assert cli.main(["eval", f"preset={run_dir}", "tasks=[mistral_tune_ppl]", "limit=2"]) == 0
    assert list(json.loads((run_dir / "summary.json").read_text())["eval"]["tasks"]) == ["mistral_tune_ppl"]
