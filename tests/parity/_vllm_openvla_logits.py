"""Runs vLLM's OpenVLAForActionPrediction on a checkpoint; a subprocess of the parity test.

Usage: python _vllm_openvla_logits.py REQUEST_JSON OUTPUT_NPZ. The request names the checkpoint,
a .npy of uint8 RGB images [N, 224, 224, 3], one prompt (token ids) per image, the action id range
and the number of tokens to decode. The output holds, for every image, the greedy action tokens
[N, T] and the raw logits of all action ids at every decoded position [N, T, n_bins].

vLLM returns at most 128 ids per request through `logprob_token_ids`, so each image goes in as
two requests that ask for one half of the action ids each; both decode the same greedy tokens.
With `logprobs_mode="raw_logits"` the returned values are the model's logits before the
allowed-ids mask, i.e. exactly what our policy's `_action_logits` returns.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(request_path: str, output_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    request = json.loads(open(request_path).read())
    images = np.load(request["images"])
    prompts = request["prompt_token_ids"]
    first, end = request["action_vocab_start"], request["action_vocab_end"]
    max_tokens = request["max_tokens"]
    action_ids = list(range(first, end))
    halves = [action_ids[: len(action_ids) // 2], action_ids[len(action_ids) // 2 :]]

    llm = LLM(
        model=request["checkpoint"],
        dtype="float32",
        seed=0,
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=2 * len(prompts),
        # An explicit KV-cache size skips the CPU backend's memory-fraction check and warm-up.
        kv_cache_memory_bytes=256 * 2**20,
        limit_mm_per_prompt={"image": 1},
        logprobs_mode="raw_logits",
    )
    inputs, params = [], []
    for image, ids in zip(images, prompts, strict=True):
        for half in halves:
            inputs.append(
                {"prompt_token_ids": ids, "multi_modal_data": {"image": Image.fromarray(image)}}
            )
            params.append(
                SamplingParams(
                    max_tokens=max_tokens,
                    temperature=0.0,
                    allowed_token_ids=action_ids,
                    logprob_token_ids=half,
                    detokenize=False,
                )
            )
    outputs = llm.generate(inputs, params, use_tqdm=False)

    n_images = len(prompts)
    tokens = np.zeros((n_images, max_tokens), dtype=np.int64)
    logits = np.full((n_images, max_tokens, len(action_ids)), np.nan, dtype=np.float64)
    for i in range(n_images):
        pair = [outputs[2 * i].outputs[0], outputs[2 * i + 1].outputs[0]]
        if list(pair[0].token_ids) != list(pair[1].token_ids):
            raise RuntimeError(f"image {i}: the two requests decoded different tokens {pair}")
        tokens[i] = pair[0].token_ids
        for completion, half in zip(pair, halves, strict=True):
            for t, position in enumerate(completion.logprobs):
                for token_id in half:
                    logits[i, t, token_id - first] = position[token_id].logprob
    if np.isnan(logits).any():
        raise RuntimeError("vLLM returned no logit for some action ids")
    np.savez(output_path, tokens=tokens, logits=logits)


if __name__ == "__main__":  # vLLM spawns its workers: building LLM needs this guard
    main(sys.argv[1], sys.argv[2])
