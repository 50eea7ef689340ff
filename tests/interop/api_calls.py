"""The same keras-hub-style API calls, run with keras-hub or with mistral-tune; prints one JSON object.

    KERAS_BACKEND=torch .venv-keras/bin/python tests/interop/api_calls.py keras_hub PRESET_DIR WORK_DIR
    .venv/bin/python tests/interop/api_calls.py mistral_tune PRESET_DIR WORK_DIR

tests/interop/test_keras_hub.py runs both on one preset and compares the answers. Only the import
and the tensor-to-list conversion differ between the two runs.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


def main(impl: str, preset: str, work: str) -> dict:
    if impl == "keras_hub":
        os.environ.setdefault("KERAS_BACKEND", "torch")
        import keras
        import keras_hub

        causal_lm = keras_hub.models.MistralCausalLM

        def to_numpy(x):
            return keras.ops.convert_to_numpy(x)
    else:
        from mistral_tune import MistralCausalLM as causal_lm

        def to_numpy(x):
            return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    results: dict = {}
    lm = causal_lm.from_preset(preset)
    lm.compile(sampler="greedy")
    results["batched"] = lm.generate(PROMPTS, max_length=24)
    results["single"] = lm.generate(PROMPTS[0], max_length=20, strip_prompt=True)

    # Token ids in, token ids out, with the preprocessor detached (keras-hub's low-level path).
    preprocessor = lm.preprocessor
    x = preprocessor.generate_preprocess([PROMPTS[0]], sequence_length=20)
    prompt_len = int(to_numpy(x["padding_mask"]).sum())
    lm.preprocessor = None
    out = lm.generate(x, stop_token_ids=None)
    lm.preprocessor = preprocessor
    new = to_numpy(out["token_ids"])[0, prompt_len:20].astype(int).tolist()
    results["ids_path_new_tokens"] = new
    stop = new[3]
    results["custom_stop"] = lm.generate(PROMPTS[0], max_length=20, stop_token_ids=(stop,), strip_prompt=True)

    batch = preprocessor.generate_preprocess(PROMPTS, sequence_length=16)
    ids = to_numpy(batch["token_ids"]).astype("int32")
    mask = to_numpy(batch["padding_mask"]).astype(bool)
    loss = lm.score(token_ids=ids, padding_mask=mask, scoring_mode="loss", target_ids=np.roll(ids, -1, axis=1))
    results["score_loss"] = to_numpy(loss).astype("float64").tolist()
    results["score_mask"] = mask.tolist()

    lm.backbone.enable_lora(rank=4)
    results["lora_trainable"] = int(sum(np.prod(tuple(w.shape)) for w in lm.backbone.trainable_weights))
    saved = os.path.join(work, f"saved_{impl}")
    lm.save_to_preset(saved)
    again = causal_lm.from_preset(saved)
    again.compile(sampler="greedy")
    results["reloaded_single"] = again.generate(PROMPTS[0], max_length=20, strip_prompt=True)
    return results


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
