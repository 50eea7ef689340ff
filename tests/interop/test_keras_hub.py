"""Interop with the real keras-hub, both directions, in its own venv (``make keras-hub-venv``).

``make test`` sets KERAS_HUB_PYTHON to that venv's python; without it (a plain ``pytest`` run) these
tests skip. The keras-hub side (``keras_hub_side.py``, ``api_calls.py``) runs once per module in a
subprocess with KERAS_BACKEND=torch; this side exports, loads what keras-hub wrote, and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mistral_tune import MistralCausalLM, MistralTokenizer

HERE = Path(__file__).parent
KERAS_PYTHON = os.environ.get("KERAS_HUB_PYTHON")

pytestmark = [
    pytest.mark.skipif(not KERAS_PYTHON, reason="KERAS_HUB_PYTHON is not set (make test sets it)"),
    pytest.mark.usefixtures("single_thread"),
]

IDS = [[1, 415, 5565, 302, 4843, 349, 264, 1664, 28723, 13, 1014, 2936] + [28705 + i for i in range(40)]]
STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and   repeated spaces ",
    "naïve café — déjà vu",
    "数学はとても面白い",
    "emoji 🙂🚀 and symbols ∑∫√",
    "line one\nline two\ttabbed",
    "[INST] literal control text [/INST] </s> <s>",
    "1234567890 3.14159 -42",
    "",
]
# The tiny backbone in keras-hub's argument names (mistral_tiny's architecture).
BACKBONE = dict(
    vocabulary_size=32000,
    num_layers=2,
    num_query_heads=4,
    hidden_dim=256,
    intermediate_dim=768,
    num_key_value_heads=2,
    sliding_window=32,
    layer_norm_epsilon=1e-5,
)


def keras_run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONHASHSEED": "0"}
    proc = subprocess.run([KERAS_PYTHON, *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def interop(tmp_path_factory):
    """Our tiny model (weights rounded to float16 values, which keras-hub's converter casts through,
    so its rounding changes nothing) exported; then the keras-hub side run once on it."""
    work = tmp_path_factory.mktemp("keras_interop")
    lm = MistralCausalLM.from_preset("mistral_tiny")
    with torch.no_grad():
        for p in lm.hf_model.parameters():
            p.copy_(p.half().float())
    ours = work / "ours"
    lm.save_to_preset(ours)
    plan = {
        "ours": str(ours),
        "vocabulary": str(lm.tokenizer.model_file),
        "out": str(work),
        "ids": IDS,
        "greedy_steps": 40,
        "strings": STRINGS,
        "seed": 7,
        "backbone": BACKBONE,
        "sequence_length": 64,
    }
    (work / "plan.json").write_text(json.dumps(plan))
    keras_run(str(HERE / "keras_hub_side.py"), str(work / "plan.json"))
    return lm, work, json.loads((work / "keras_results.json").read_text())


def greedy_ids(lm: MistralCausalLM, prompt: list[int], steps: int) -> list[int]:
    lm.compile(sampler="greedy")
    x = {
        "token_ids": torch.tensor([prompt + [0] * steps]),
        "padding_mask": torch.tensor([[1] * len(prompt) + [0] * steps]),
    }
    return lm.generate(x, stop_token_ids=None)["token_ids"][0, len(prompt) :].tolist()


def test_our_export_loads_in_keras_hub_with_equal_logits_and_greedy_tokens(interop):
    lm, _, res = interop
    ours = lm(token_ids=IDS).detach().double().numpy()
    theirs = np.array(res["ours_in_keras"]["logits"])
    diff = float(np.abs(ours - theirs).max())
    print(f"our export in keras-hub {res['keras_hub_version']}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4
    assert greedy_ids(lm, IDS[0], 40) == res["ours_in_keras"]["greedy"]  # past the 32-token window


def test_keras_hub_presets_load_here_with_equal_logits(interop):
    _, work, res = interop
    theirs = np.array(res["keras_own"]["logits"])
    keras_format = MistralCausalLM.from_preset(str(work / "keras_preset"))  # model.weights.h5 + config.json
    exported = MistralCausalLM.from_preset(str(work / "keras_hf"))  # keras-hub's export_to_transformers
    for name, model in (("keras preset (h5)", keras_format), ("export_to_transformers", exported)):
        diff = float(np.abs(model(token_ids=IDS).detach().double().numpy() - theirs).max())
        print(f"{name} -> mistral-tune: max |logit diff| = {diff:.2e}")
        assert diff < 1e-5
        assert greedy_ids(model, IDS[0], 40) == res["keras_own"]["greedy"]
    assert keras_format.preprocessor.sequence_length == 64  # read from its preprocessor.json
    lora = MistralCausalLM.from_preset(str(work / "keras_preset_lora"))  # a keras-hub LoRA fine-tune
    tuned = np.array(res["keras_lora"]["logits"])
    diff = float(np.abs(lora(token_ids=IDS).detach().double().numpy() - tuned).max())
    print(f"keras-hub LoRA fine-tune (h5) -> mistral-tune: max |logit diff| = {diff:.2e}")
    assert diff < 1e-5 and np.abs(tuned - theirs).max() > 1e-2  # the LoRA changed the model


def test_tokenizer_ids_are_keras_hubs(interop):
    lm, _, res = interop
    tok = MistralTokenizer(proto=lm.tokenizer.model_file.read_bytes())
    assert [tok(s) for s in STRINGS] == res["tokenizer_ids"]
    assert [tok.detokenize(ids) for ids in res["tokenizer_ids"]] == res["detokenized"]


def test_the_same_api_calls_give_the_same_answers(interop):
    _, work, _ = interop
    preset = str(work / "ours")
    keras = json.loads(keras_run(str(HERE / "api_calls.py"), "keras_hub", preset, str(work)).stdout.splitlines()[-1])
    proc = subprocess.run(
        [sys.executable, str(HERE / "api_calls.py"), "mistral_tune", preset, str(work)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = json.loads(proc.stdout.splitlines()[-1])
    for key in ("batched", "single", "ids_path_new_tokens", "custom_stop", "score_mask", "reloaded_single"):
        assert ours[key] == keras[key], key
    assert ours["reloaded_single"] == ours["single"]  # LoRA starts at zero, so the saved model is unchanged
    mask = np.array(ours["score_mask"])
    # keras-hub's loss counts every position; compare where the target is a real token.
    valid = mask & np.roll(mask, -1, axis=1)
    diff = np.abs(np.array(ours["score_loss"]) - np.array(keras["score_loss"]))[valid].max()
    print(
        f"api calls: texts and ids equal; score loss max diff {diff:.2e}; "
        f"LoRA rank 4 trainable: keras-hub {keras['lora_trainable']:,}, ours {ours['lora_trainable']:,}"
    )
    assert diff < 1e-4
    # The documented difference in LoRA parameterization, from the architecture alone:
    # PEFT: r * (in + out) per projection; keras-hub's EinsumDense LoRA: r * (in * heads + head_dim).
    r, d, layers, hd = 4, BACKBONE["hidden_dim"], BACKBONE["num_layers"], 64
    heads = {"q": BACKBONE["num_query_heads"], "v": BACKBONE["num_key_value_heads"]}
    assert ours["lora_trainable"] == layers * sum(r * (d + h * hd) for h in heads.values())
    assert keras["lora_trainable"] == layers * sum(r * (d * h + hd) for h in heads.values())
