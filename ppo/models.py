"""Loading the models PPO trains: the policy (a causal LM, left-padded), its value model (a
scalar head on a copy of a backbone) and LoRA adapters. Models load in fp32 by default: trained
weights keep fp32 masters, and bf16 is autocast compute chosen by reward.precision.

    from ppo.models import load_policy
    model, tokenizer = load_policy("data/models/SmolLM2-135M-Instruct", lora=True)

With LoRA the reference policy is the same model with its adapters switched off
(`with model.disable_adapter():`), so no second copy of the weights is kept in memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ppo.errors import PPOError

# Adapters on every linear layer of the blocks adapt more than attention-only adapters for the
# same rank (QLoRA paper); r=16, alpha=32 is the common starting point for 100M-1B models.
DEFAULT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


def lora_config(lora: Any, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from True (defaults), a dict of LoraConfig fields, or a LoraConfig."""
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    fields = dict(DEFAULT_LORA)
    if isinstance(lora, dict):
        fields.update(lora)
    elif lora is not True:
        raise PPOError(f"lora must be True, a dict of LoraConfig fields or a LoraConfig, got {lora!r}")
    try:
        return LoraConfig(task_type=task_type, **fields)
    except TypeError as exc:
        raise PPOError(f"bad LoRA option: {exc}") from None


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    # Prompts of different lengths must end at the same column so that generation continues
    # every row from its last prompt token.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path_or_hub_id: str | Path, dtype: torch.dtype | None = None, lora: Any = None):
    """(model, tokenizer) for a causal LM directory or hub id; a LoRA adapter directory is loaded
    on its base and merged. `lora` (True, a dict of LoraConfig fields or a LoraConfig) wraps the
    model in fresh trainable adapters. The tokenizer pads on the left."""
    from transformers import AutoModelForCausalLM

    path = str(path_or_hub_id)
    local = Path(path)
    if (local.exists() or path.startswith((".", "/"))) and not (local / "config.json").exists() and not (
        local / "adapter_config.json"
    ).exists():
        raise PPOError(f"policy {path}: not a model directory (no config.json or adapter_config.json)")
    dtype = dtype or torch.float32
    adapter_cfg = local / "adapter_config.json"
    try:
        if adapter_cfg.exists():
            from peft import PeftModel

            base_path = json.loads(adapter_cfg.read_text(encoding="utf-8"))["base_model_name_or_path"]
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
            tokenizer = _load_tokenizer(path if (local / "tokenizer_config.json").exists() else base_path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = _load_tokenizer(path)
    except OSError as exc:
        raise PPOError(f"policy {path}: cannot load: {exc}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(lora))
    return model, tokenizer


def _backbone(model: nn.Module) -> nn.Module:
    if is_peft(model):
        model = model.get_base_model()
    return getattr(model, model.base_model_prefix)


def _head(model: nn.Module) -> nn.Module:
    if is_peft(model):
        model = model.get_base_model()
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise PPOError(f"value model {type(model).__name__} has no scalar head (score/classifier/v_head)")


def load_value_model(path: str | Path, dtype: torch.dtype | None = None):
    """A sequence-classification model with one output (a reward model directory, typically),
    used per token as PPO's value model."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise PPOError(f"value model {path}: cannot load as a sequence classifier: {exc}") from None
    _head(model)
    return model


def value_model_from_policy(policy: nn.Module) -> nn.Module:
    """A value model whose backbone is a copy of the policy's and whose scalar head starts at
    zero, so the first values are 0 rather than noise the advantages would have to undo."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    dtype = next(policy.parameters()).dtype
    value = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    _backbone(value).load_state_dict(_base_weights(_backbone(policy).state_dict()))
    head = _head(value)
    nn.init.zeros_(head.weight)
    if getattr(head, "bias", None) is not None:
        nn.init.zeros_(head.bias)
    return value


def _base_weights(state: dict) -> dict:
    """A LoRA-wrapped module's state dict as the plain module's: adapters dropped, base names."""
    out = {}
    for key, tensor in state.items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        out[key.replace(".base_layer", "").replace(".original_module", "")] = tensor
    return out


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers map text to the same ids (then a reward model can be a value model)."""
    return a.get_vocab() == b.get_vocab()


def get_lora_policy(model: nn.Module, lora: Any) -> nn.Module:
    """The policy wrapped in fresh trainable LoRA adapters (the base weights stay frozen)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


def add_value_lora(value: nn.Module, lora: Any) -> nn.Module:
    """LoRA adapters on the value model's backbone; its scalar head stays fully trainable."""
    from peft import get_peft_model

    cfg = copy.deepcopy(lora_config(lora, task_type="SEQ_CLS"))
    return get_peft_model(value, cfg)


class SamplingCopy:
    """What the policy samples from: a plain copy of it, in `dtype`, refreshed from the live
    weights each time the copy is called. Training never reads the copy: the rollout's log-probs
    and values come from the live policy, so only which tokens are drawn can change, by rounding.

    - LoRA: the copy's adapted layers hold W + scale * B @ A. Unmerged adapters add two small
      matmuls beside every adapted linear layer, and at one token per forward those are mostly
      overhead: SmolLM2-135M with adapters on every linear layer, 16 prompts x 53 new tokens,
      bf16 autocast on this project's 2-core CPU, generated in 9.5 s with the adapters and 4.7 s
      merged. peft's merge_adapter/unmerge_adapter would do it in place, but every unmerge rounds
      the frozen weights a little and the reference policy is those weights, so the merged
      weights live in a copy: one more copy of the adapted matrices.
    - Full fine-tuning, where generation computes in bf16: a bf16 copy of the fp32 policy
      (refreshing it is one cast of the weights, 42 ms for SmolLM2-135M). Autocast would cast the
      same weights at each generate() and run every op through its dispatcher; from the copy,
      16 prompts x 53 tokens took 3.8 s against 4.3 s here. An fp32 copy would buy nothing, so
      callers build this one only for bf16."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype | None = None):
        # Each weight is copied straight into `dtype` (deepcopy takes the copies from its memo), so
        # no second fp32 copy of the model exists even for a moment; tied weights stay tied.
        # Buffers (RoPE's inverse frequencies) stay as they are: fp32, as transformers keeps them
        # in bf16 models.
        memo = {id(p): nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
                for p in policy.parameters()}
        self._pairs = []
        if is_peft(policy):
            from peft.tuners.lora.layer import Linear as LoraLinear

            self._adapter = policy.active_adapters[0]
            self.model = copy.deepcopy(policy, memo).unload().eval()
            for name, module in policy.get_base_model().named_modules():
                if isinstance(module, LoraLinear):
                    target = self.model.get_submodule(name)
                    # Its own storage: an adapted lm_head can be tied to the input embeddings,
                    # which must keep the base weights.
                    target.weight = nn.Parameter(torch.empty_like(target.weight), requires_grad=False)
                    self._pairs.append((module, target))
        else:
            self._adapter = None
            self.model = copy.deepcopy(policy, memo).eval()
            self._pairs = [(p, self.model.get_parameter(name)) for name, p in policy.named_parameters() if p.requires_grad]
        # transformers hands lm_head the last position's hidden states as a slice, not contiguous.
        # With bf16 weights and a bf16 input no autocast copy intervenes, and torch's CPU matmul
        # then copies the whole weight once per row: 1.2 s of SmolLM2's prefill for 16 prompts,
        # against 4 ms from a contiguous input.
        self.model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
        self()

    @staticmethod
    def supports(policy: nn.Module) -> bool:
        """A policy without adapters, or one whose only trained weights are plain LoRA adapters on
        linear layers, one active."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        if not is_peft(policy):
            return True
        if len(policy.active_adapters) != 1:
            return False
        adapter = policy.active_adapters[0]
        for module in policy.get_base_model().modules():
            if isinstance(module, LoraLayer) and (type(module) is not LoraLinear or module.use_dora.get(adapter)):
                return False
        return all("lora_" in name for name, p in policy.named_parameters() if p.requires_grad)

    @torch.no_grad()
    def __call__(self) -> nn.Module:
        """The copy, with the policy's current weights (LoRA: the adapters merged in)."""
        if self._adapter is None:
            for live, target in self._pairs:
                target.copy_(live)
            return self.model
        for live, target in self._pairs:
            delta = live.get_delta_weight(self._adapter)
            # In the adapters' precision (fp32), then rounded once, also where the base is held in bf16.
            target.weight.copy_(live.base_layer.weight.to(delta.dtype) + delta)
        return self.model


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def hold_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of `model`'s frozen linear layers in `dtype` (bf16 where PPO computes in
    bf16): a LoRA policy's base layers, a frozen reference. Returns how many values changed dtype.

    Under bf16 autocast a linear layer computes from a bf16 cast of its weight either way, so the
    outputs and gradients are the same bit for bit. What changes: autocast keeps the casts only of
    weights that train, so a frozen fp32 weight is cast again at every forward (SmolLM2-135M
    with LoRA, mini-batch 4 x 181 tokens: update 8% faster with the cast gone), and the frozen
    weights take half the memory. Weights that train stay fp32, and so do embeddings and any
    linear layer tied to one (an lm_head sharing the input embeddings), which are looked up, not
    only multiplied. Callers must run every forward of `model` under autocast afterwards."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    changed = 0
    for module in model.modules():
        if type(module) is not nn.Linear:  # plain layers only: LoRA's base layers, not its wrappers
            continue
        for p in (module.weight, module.bias):
            if p is not None and not p.requires_grad and id(p) not in embedded and p.dtype != dtype:
                p.data = p.data.to(dtype)
                changed += p.numel()
    return changed


@contextlib.contextmanager
def frozen_in_fp32(model: nn.Module):
    """Frozen bf16 weights (hold_frozen_linears) in fp32 for the duration, and their own bf16
    tensors back after: peft merges adapters in place, and a merge into bf16 weights would round
    the merged weights (an unmerge, the frozen ones). bf16 values are exact in fp32, so the merge
    adds the adapters to the very weights training used."""
    held = [(p, p.data) for p in model.parameters() if not p.requires_grad and p.dtype == torch.bfloat16]
    for p, data in held:
        p.data = data.float()
    try:
        yield
    finally:
        for p, data in held:
            p.data = data


class ValueHead(nn.Module):
    """The value of a shared backbone (PPOConfig.value_model = "shared"): one linear layer on the
    policy's last hidden state, zero at the start like value_model_from_policy's head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()


def value_head_for(policy: nn.Module) -> ValueHead:
    config = (policy.get_base_model() if is_peft(policy) else policy).config
    return ValueHead(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)


class PolicyAndValue(nn.Module):
    """Both trained models behind one forward, so that one DDP wrapper syncs both and one
    optimizer steps both (as TRL and CleanRL's shared-trunk agents do). `value` is a separate
    sequence-classification model, or a ValueHead on the policy's own hidden states."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value

    @property
    def shared(self) -> bool:
        return isinstance(self.value, ValueHead)

    def forward(self, input_ids, attention_mask, position_ids, response_width: int):
        """Logits `[B, T, V]` and values `[B, T]` at the positions that predict the last T tokens."""
        width = input_ids.shape[1]
        if self.shared:
            out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                              logits_to_keep=response_width + 1, output_hidden_states=True)
            hidden = out.hidden_states[-1][:, width - response_width - 1 : width - 1]
            return out.logits[:, :response_width], self.value(hidden)
        # Only the last T + 1 positions go through lm_head: prompt positions would cost a
        # vocabulary-wide matmul each (49k columns for SmolLM2) for logits nobody reads.
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            logits_to_keep=response_width + 1,
        ).logits[:, :response_width]
        values = values_forward(self.value, input_ids, attention_mask, position_ids)
        return logits, values[:, width - response_width - 1 : width - 1]


def values_forward(value: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Per-token scalar values `[B, S]` from a sequence-classification model's backbone and head."""
    hidden = _backbone(value)(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return _head(value)(hidden).squeeze(-1).float()


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them, or only adapters and heads with LoRA)."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise PPOError(f"checkpoint does not match the model: unknown parameters {missing[:3]}...")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
