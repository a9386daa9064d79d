"""PPO checkpoints and the models a run leaves: everything a resumed run needs, written atomically.

    save_checkpoint(root, step, config, inner, optimizer, scheduler, kl_ctl, reward_moments, trainable_state)
    state = load_checkpoint(root, resume=True, config=config)     # None without resume
    save_final(out, inner, tokenizer)                              # policy/ and value/

A checkpoint (checkpoints/step-N/state.pt) holds the trainable weights, the optimiser and
scheduler, the KL controller, the reward normaliser's moments and every RNG state, as plain
tensors and numbers (it loads with weights_only=True). With keep_best=judge the best judged
policy so far is kept in best-policy/ and, at the end, becomes policy/ (the last step's moves to
policy-last/). ppo.train's loop calls these; seeding lives here too, since resuming is what makes
it matter.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import torch

from ppo.config import PPOConfig
from ppo.errors import PPOError

logger = logging.getLogger("ppo.train")


BEST_DIR = "best-policy"  # the judges' best policy so far, while a keep_best=judge run goes on


LAST_DIR = "policy-last"  # the last step's policy when keep_best=judge kept an earlier one


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def step_seed(seed: int, step: int, process_index: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + process_index) % (2**63)


def rng_state() -> dict:
    import numpy as np

    # Plain tensors, ints and tuples only, so a checkpoint loads with torch.load(weights_only=True).
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Fields a resumed run may change. Only `steps` touches training: a longer run re-stretches a
# linear or cosine schedule from the resumed step on (keep `steps` to get exactly the next step).
RESUME_MAY_CHANGE = {"steps", "save_every", "keep_checkpoints", "samples_every", "tensorboard", "mlflow", "judge_every"}


def _resumable(current: dict, saved: dict) -> dict:
    merged = dict(current)
    for k in RESUME_MAY_CHANGE:
        if k in saved:
            merged[k] = saved[k]
    return merged


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(root.glob("step-*/state.pt")) if root.exists() else []
    return found[-1].parent if found else None


def save_checkpoint(root: Path, step, config, inner, optimizer, scheduler, kl_ctl, reward_moments, trainable_state) -> Path:
    """Everything the next step depends on, written atomically (temp file, then rename)."""
    path = root / f"step-{step:06d}"
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "config": config.to_dict(),
        "policy": trainable_state(inner.policy),
        "value": trainable_state(inner.value),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "kl_ctl": kl_ctl.state_dict(),
        "reward_moments": reward_moments.state_dict(),
        "rng": rng_state(),
    }
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")
    for old in sorted(root.glob("step-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_model(module, target: Path, tokenizer) -> None:
    """A plain model directory (LoRA merged in), loadable by load_policy."""
    from ppo.models import is_peft

    if is_peft(module):
        # Merged in place and unmerged after saving: a merged copy would add a whole model
        # to the peak memory that LoRA is there to keep low. Base weights held in bf16 merge in
        # fp32 and get their own bf16 tensors back (frozen_in_fp32).
        from ppo.models import _base_weights, frozen_in_fp32

        base = module.get_base_model()
        with frozen_in_fp32(module):
            module.merge_adapter()
            try:
                base.save_pretrained(target, state_dict=_base_weights(base.state_dict()))
            finally:
                module.unmerge_adapter()
    else:
        module.save_pretrained(target)
    tokenizer.save_pretrained(target)


VALUE_HEAD_FILE = "value_head.safetensors"


def save_final(out: Path, inner, tokenizer) -> dict:
    """policy/ and value/ as plain model directories (LoRA merged in), loadable by load_policy; a
    shared value head (value_model=shared) is its one layer's weights in value_head.safetensors."""
    paths = {}
    save_model(inner.policy, out / "policy", tokenizer)
    paths["policy_path"] = str(out / "policy")
    if getattr(inner, "shared", False):
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in inner.value.state_dict().items()}, str(out / VALUE_HEAD_FILE))
        paths["value_path"] = str(out / VALUE_HEAD_FILE)
    else:
        save_model(inner.value, out / "value", tokenizer)
        paths["value_path"] = str(out / "value")
    return paths


def save_best(out: Path, inner, tokenizer, best: dict) -> None:
    """The policy of the best judged step so far in best-policy/, replaced whole (temp dir, then rename)."""
    tmp, target = out / (BEST_DIR + ".tmp"), out / BEST_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(inner.policy, tmp, tokenizer)
    (tmp / "kept.json").write_text(json.dumps(best), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def best_so_far(out: Path, start_step: int, history: list[dict]) -> dict | None:
    """The best judged step a resumed keep_best=judge run starts from: best-policy/'s, unless it
    was written after the checkpoint resumed from (those steps run again and judge again)."""
    path = out / BEST_DIR / "kept.json"
    if start_step and path.is_file():
        best = json.loads(path.read_text(encoding="utf-8"))
        if best["step"] <= start_step:
            return best
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)
    judged = [r for r in history if "judge_reward" in r]
    if judged:
        peak = max(judged, key=lambda r: r["judge_reward"])
        logger.warning("keep_best=judge: the policy of judged step %d is not saved any more; the best is chosen among "
                       "the steps after %d", peak["step"], start_step)
    return None


def keep_best_policy(out: Path, config: PPOConfig, best: dict | None) -> dict:
    """With keep_best=judge, policy/ becomes the best judged step's policy and the last step's
    moves to policy-last/ (value/ stays the last step's). Says which step policy/ holds."""
    last = {"keep_best": config.keep_best, "kept_step": config.steps}
    if config.keep_best != "judge" or best is None or best["step"] == config.steps:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        return last
    shutil.rmtree(out / LAST_DIR, ignore_errors=True)
    os.replace(out / "policy", out / LAST_DIR)
    os.replace(out / BEST_DIR, out / "policy")
    logger.info("keep_best=judge: policy/ is step %d's (judge reward %.4f); the last step's is in %s/",
                best["step"], best["judge_reward"], LAST_DIR)
    return {"keep_best": "judge", "kept_step": best["step"], "kept_judge_reward": best["judge_reward"],
            "policy_last_path": str(out / LAST_DIR)}



def load_checkpoint(root: Path, resume, config: PPOConfig) -> tuple[dict, Path]:
    """The state to resume from: the newest checkpoint under `root` (resume True) or the directory
    `resume` names, checked against `config` (only RESUME_MAY_CHANGE may differ)."""
    ckpt = latest_checkpoint(root) if resume is True else Path(resume)
    if ckpt is None:
        raise PPOError(f"resume: no checkpoint under {root}")
    # weights_only: a checkpoint is data (tensors, numbers, strings); nothing in it is unpickled
    # as code, whatever directory --resume names.
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise PPOError(f"resume {ckpt}: state.pt is not a PPO checkpoint this version can read ({exc})") from None
    # Fields added since the checkpoint was written count as their defaults.
    saved_config = {**type(config)().to_dict(), **state["config"]}
    if saved_config != _resumable(config.to_dict(), saved_config):
        changed = sorted(k for k, v in saved_config.items() if config.to_dict().get(k) != v and k not in RESUME_MAY_CHANGE)
        raise PPOError(f"resume {ckpt}: config differs from the checkpoint's in {', '.join(changed)}")
    return state, ckpt
