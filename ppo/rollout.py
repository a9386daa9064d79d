"""Rollouts: sample responses from the policy, cut them after the first EOS, score the decoded
text with a reward function, and compute the per-token numbers PPO needs (policy and
reference log-probs, values, entropy) on the generated tokens.

The reward model may use another tokenizer than the policy, so scoring works on text: a reward
function is any `callable(prompts, responses_text) -> tensor[B]`, for example
`reward.score.load_reward_model(dir).score`, or `ensemble_reward_fn(scorer, k)` for an
ensemble, which scores mean - k * spread.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ppo import core
from ppo.errors import PPOError
from ppo.models import PolicyAndValue, is_peft, values_forward

RewardFn = Callable[[list, list[str]], torch.Tensor]


def prompt_text(prompt: Any) -> str:
    """A prompt (text or chat messages) as plain text, for tokenizers without a chat template."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def encode_prompts(tokenizer, prompts: Sequence[Any], max_prompt_length: int, use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt, ready to continue with the assistant's answer: through the chat
    template when the tokenizer has one (a text prompt becomes one user message), else as raw
    text. Long prompts keep their end, the part the response follows."""
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    encoded = []
    for prompt in prompts:
        if templated:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = tokenizer(prompt_text(prompt), add_special_tokens=True)["input_ids"]
        ids = list(ids)[-max_prompt_length:]
        if not ids:
            raise PPOError(f"prompt {len(encoded) + 1} is empty after tokenisation")
        encoded.append(ids)
    return encoded


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask `[B, P]`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def truncate_after_eos(response_ids: torch.Tensor, eos_ids: Sequence[int], pad_id: int):
    """Keep each response up to and including its first EOS; pad the rest.
    Returns (ids, mask, contains_eos)."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    contains_eos = is_eos.any(1)
    T = response_ids.shape[1]
    first = torch.where(contains_eos, is_eos.float().argmax(1), torch.full_like(contains_eos, T - 1, dtype=torch.long))
    mask = (torch.arange(T, device=response_ids.device)[None, :] <= first[:, None]).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return ids, mask, contains_eos


def _eos_ids(tokenizer, model) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    if not ids:
        raise PPOError("the policy's tokenizer has no EOS token; responses could never end")
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float):
    """Sample responses with temperature (no top-k/top-p: PPO's log-probs must be those of the
    distribution actually sampled), KV cache on. Returns (response ids, mask, contains_eos)."""
    from transformers import GenerationConfig

    eos = _eos_ids(tokenizer, model)
    config = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        min_new_tokens=0, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    # generate() fills options the caller left at their defaults from the model's own
    # generation_config (SmolLM2 ships top_p=0.9); swapping it out keeps sampling pure.
    inner = model.get_base_model() if is_peft(model) else model
    saved = inner.generation_config
    inner.generation_config = config
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    finally:
        inner.generation_config = saved
    response = out[:, prompt_ids.shape[1]:]
    if response.shape[1] == 0:
        raise PPOError("generation returned no tokens; check max_new_tokens")
    return truncate_after_eos(response, eos, tokenizer.pad_token_id)


def sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask):
    """Concatenated ids, attention mask and position ids that match what generate() used
    (positions count real tokens only, so left padding does not shift them)."""
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def response_slice(x: torch.Tensor, prompt_width: int, response_width: int) -> torch.Tensor:
    """The outputs that predict the response tokens: position t predicts token t + 1."""
    return x[:, prompt_width - 1 : prompt_width - 1 + response_width]


def policy_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits


def response_logits(model, input_ids, attention_mask, position_ids, response_width: int) -> torch.Tensor:
    """Logits at the positions that predict the last `response_width` tokens, computing lm_head
    on those positions only."""
    return model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
        logits_to_keep=response_width + 1,
    ).logits[:, :response_width]


def reference_context(policy, ref_model):
    """The reference forward's context: adapters off when the policy is a LoRA model."""
    if ref_model is None:
        if not is_peft(policy):
            raise PPOError("no reference model: pass ref_model, or use a LoRA policy (reference = adapters off)")
        return policy.disable_adapter()
    return contextlib.nullcontext()


def ensemble_reward_fn(scorer, spread_coef: float) -> RewardFn:
    """A reward function over an ensemble scorer: mean - spread_coef * spread, which holds the
    policy back where the reward models disagree (uncertainty-penalised reward)."""

    def reward(prompts, responses):
        mean, spread = scorer.score_with_spread(prompts, responses)
        return mean - spread_coef * spread

    return reward


@dataclass
class Rollout:
    """One batch of episodes with everything the update needs, on the training device."""

    prompts: list
    responses_text: list[str]
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    contains_eos: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    entropy: torch.Tensor
    time_generate: float
    time_score: float
    time_forward: float


def score_responses(reward_fn: RewardFn, prompts: list, texts: list[str]) -> torch.Tensor:
    scores = reward_fn(prompts, texts)
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()
    if scores.numel() != len(texts):
        raise PPOError(f"reward function returned {scores.numel()} scores for {len(texts)} responses")
    if not torch.isfinite(scores).all():
        raise PPOError("reward function returned a NaN or infinite score")
    return scores


@torch.no_grad()
def collect(
    wrapped: PolicyAndValue,
    ref_model,
    tokenizer,
    prompts: list,
    prompt_rows: list[list[int]],
    reward_fn: RewardFn,
    *,
    max_new_tokens: int,
    temperature: float,
    device: torch.device,
    generate_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    forward_ctx: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    sampler: Callable[[], Any] | None = None,
) -> Rollout:
    """Generate, score, and run the policy, reference and value forwards on one batch.
    `generate_ctx` and `forward_ctx` give the precision contexts (autocast or none) of sampling and
    of the forwards; the forwards must compute as the update does, so the first ratio is 1.
    `sampler()`, when given, returns the model to sample from (ppo.models.SamplingCopy: the LoRA
    policy merged, or a bf16 copy); the log-probs are still the policy's own."""
    policy, value = wrapped.policy, wrapped.value
    prompt_ids, prompt_mask = (t.to(device) for t in left_pad(prompt_rows, tokenizer.pad_token_id))

    t0 = time.perf_counter()
    sampling_model = policy if sampler is None else sampler()
    with generate_ctx():
        response_ids, response_mask, contains_eos = generate(sampling_model, tokenizer, prompt_ids, prompt_mask,
                                                             max_new_tokens, temperature)
    t1 = time.perf_counter()

    texts = tokenizer.batch_decode([ids[m.bool()] for ids, m in zip(response_ids, response_mask)], skip_special_tokens=True)
    scores = score_responses(reward_fn, prompts, texts).to(device)
    t2 = time.perf_counter()

    P, T = prompt_ids.shape[1], response_ids.shape[1]
    inputs = sequence_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
    shared_values = None
    with forward_ctx():
        if getattr(wrapped, "shared", False):  # one backbone: logits and values from one forward
            logits, shared_values = wrapped(*inputs, T)
        else:
            logits = response_logits(policy, *inputs, T)
    logits = logits.float() / temperature
    logprobs = core.logprobs_from_logits(logits, response_ids)
    entropy = core.entropy_from_logits(logits)
    del logits
    with reference_context(policy, ref_model):
        ref = policy if ref_model is None else ref_model
        with forward_ctx():
            ref_logits = response_logits(ref, *inputs, T)
        ref_logits = ref_logits.float() / temperature
        ref_logprobs = core.logprobs_from_logits(ref_logits, response_ids)
        del ref_logits
    if shared_values is not None:
        values = shared_values.float()
    else:
        with forward_ctx():
            values = values_forward(value, *inputs)
        values = response_slice(values.float(), P, T)
    pad = ~response_mask.bool()
    logprobs = logprobs.masked_fill(pad, core.INVALID_LOGPROB)
    ref_logprobs = ref_logprobs.masked_fill(pad, core.INVALID_LOGPROB)
    values = values.masked_fill(pad, 0.0)
    t3 = time.perf_counter()

    return Rollout(
        prompts=list(prompts), responses_text=texts, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
        response_ids=response_ids, response_mask=response_mask, contains_eos=contains_eos, scores=scores,
        logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, entropy=entropy,
        time_generate=t1 - t0, time_score=t2 - t1, time_forward=t3 - t2,
    )
