"""The keras-hub half of the interop job: runs in the keras-hub venv (.venv-keras), never imports mistral_tune.

    KERAS_BACKEND=torch .venv-keras/bin/python tests/interop/keras_hub_side.py PLAN.json

PLAN.json names an exported mistral-tune preset (``ours``), a SentencePiece file (``vocabulary``), a
work directory (``out``), token ids and strings. The script writes ``out/keras_results.json``:
keras-hub's logits and greedy tokens on our export, tokenizer ids, and the logits of a keras-hub
model of its own that it saves in keras format (``out/keras_preset``) and with
``export_to_transformers`` (``out/keras_hf``), and the same model LoRA-tuned (``out/keras_preset_lora``),
for mistral-tune to load.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402


def logits_of(lm, ids):
    ids = np.asarray(ids, dtype="int32")
    out = lm.score(token_ids=ids, padding_mask=np.ones_like(ids), scoring_mode="logits")
    return keras.ops.convert_to_numpy(out).astype("float64").tolist()


def greedy_tokens(lm, ids, steps):
    """Greedy continuation of one prompt on token ids (no preprocessor involved)."""
    ids = list(ids)
    width = len(ids) + steps
    x = {
        "token_ids": np.array([ids + [0] * steps], dtype="int32"),
        "padding_mask": np.array([[1] * len(ids) + [0] * steps], dtype="bool"),
    }
    lm.compile(sampler="greedy")
    preprocessor, lm.preprocessor = lm.preprocessor, None  # token ids in need preprocessor=None in keras-hub
    out = lm.generate(x, stop_token_ids=None)
    lm.preprocessor = preprocessor
    return keras.ops.convert_to_numpy(out["token_ids"])[0, len(ids) : width].astype(int).tolist()


def main(plan_path: str) -> None:
    plan = json.loads(open(plan_path).read())
    out = plan["out"]
    results: dict = {"keras_hub_version": keras_hub.__version__, "keras_version": keras.__version__}

    # 1. Our export -> keras-hub.
    lm = keras_hub.models.MistralCausalLM.from_preset(plan["ours"])
    results["ours_in_keras"] = {
        "logits": logits_of(lm, plan["ids"]),
        "greedy": greedy_tokens(lm, plan["ids"][0], plan["greedy_steps"]),
    }
    tokenizer = keras_hub.models.MistralTokenizer(proto=plan["vocabulary"])
    results["tokenizer_ids"] = [np.asarray(tokenizer(s)).astype(int).tolist() for s in plan["strings"]]
    results["detokenized"] = [tokenizer.detokenize(ids) for ids in results["tokenizer_ids"]]

    # 2. A keras-hub model of its own -> keras-format preset and transformers export.
    keras.utils.set_random_seed(plan["seed"])
    backbone = keras_hub.models.MistralBackbone(**plan["backbone"])
    preprocessor = keras_hub.models.MistralCausalLMPreprocessor(tokenizer, sequence_length=plan["sequence_length"])
    own = keras_hub.models.MistralCausalLM(backbone=backbone, preprocessor=preprocessor)
    own.save_to_preset(os.path.join(out, "keras_preset"))
    own.export_to_transformers(os.path.join(out, "keras_hf"))
    results["keras_own"] = {
        "logits": logits_of(own, plan["ids"]),
        "greedy": greedy_tokens(own, plan["ids"][0], plan["greedy_steps"]),
    }
    # 3. A keras-hub LoRA fine-tune (factors away from their zero init): keras saves the kernels merged.
    own.backbone.enable_lora(rank=2)
    rng = np.random.RandomState(plan["seed"])
    for w in own.backbone.trainable_weights:
        w.assign((rng.normal(size=tuple(w.shape)) * 0.05).astype("float32"))
    own.save_to_preset(os.path.join(out, "keras_preset_lora"))
    results["keras_lora"] = {"logits": logits_of(own, plan["ids"])}
    with open(os.path.join(out, "keras_results.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
