#!/usr/bin/env bash
# GPU smoke test: ppo, dpo and grpo each train a few steps under `accelerate launch` with the
# shipped DDP config on the GPUs of one machine (one process per GPU), on tiny models built here
# from a config (the machine reaches no hub and no package index), and register their runs.
#
#   bash benchmarks/gpu_smoke.sh [NUM_GPUS]            # default 1; writes under ${OUT:-/tmp}/gpu-smoke
#
# Takes a few minutes. Needs the project's Python packages importable (the venv from `make venv`,
# or the pinned wheels installed into PYTHONPATH) and torch with CUDA. Prints one line per trainer
# and a last line 'N passed, M failed'; exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
GPUS=${1:-1}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
WORK=${OUT:-/tmp}/gpu-smoke
rm -rf "$WORK"; mkdir -p "$WORK"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RLHF_DATA_DIR="$WORK/data" RLHF_DB_URL="sqlite:///$WORK/rlhf.db"

"$PY" - "$WORK" <<'PYEOF' || { echo "0 passed, 3 failed"; exit 1; }
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from reward_fixtures import save_tiny_bert, synthetic_pairs
from tiny_lm import save_tiny_policy

work = Path(sys.argv[1])
print(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, {torch.cuda.device_count()} GPU(s)")
save_tiny_policy(work / "policy")
save_tiny_bert(work / "rm-base")
with open(work / "pairs.jsonl", "w") as fh:
    for p in synthetic_pairs(64, seed=1):
        fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
with open(work / "prompts.jsonl", "w") as fh:
    for p in synthetic_pairs(32, seed=2):
        fh.write(json.dumps({"prompt": p.prompt}) + "\n")
PYEOF

"$PY" -m app.cli init >/dev/null
"$PY" -m app.cli train-rm --data "$WORK/pairs.jsonl" -o "$WORK/rm" --base "$WORK/rm-base" --epochs 1 --max-length 32 --json \
  > "$WORK/train-rm.json" 2> "$WORK/train-rm.log" || { echo "train-rm (the reward model the others need) failed; see $WORK/train-rm.log"; echo "0 passed, 3 failed"; exit 1; }

# SMOKE_ACCELERATE_CONFIG=configs/accelerate/cpu2.yaml runs the same script on two CPU processes (how it is checked without a GPU).
CONFIG=${SMOKE_ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}
LAUNCH=("$PY" -m accelerate.commands.launch --config_file "$CONFIG" --num_processes "$GPUS" -m app.cli)
passed=0; failed=0
run() {  # name, then the rlhf command line
  local name=$1; shift
  local t0=$SECONDS
  if "${LAUNCH[@]}" "$@" --json > "$WORK/$name.json" 2> "$WORK/$name.log"; then
    echo "$name: ok in $((SECONDS - t0)) s: $(tail -c 300 "$WORK/$name.json")"; passed=$((passed + 1))
  else
    echo "$name: FAILED after $((SECONDS - t0)) s; last lines of $WORK/$name.log:"; tail -n 15 "$WORK/$name.log"; failed=$((failed + 1))
  fi
}
run ppo  ppo  --reward-model "$WORK/rm" --policy "$WORK/policy" --prompts "$WORK/prompts.jsonl" -o "$WORK/ppo" --steps 3 \
              --set batch_size=8 --set mini_batch_size=4 --set max_new_tokens=8 --set tensorboard=false
run dpo  dpo  --data "$WORK/pairs.jsonl" --base "$WORK/policy" -o "$WORK/dpo" --max-steps 3 --batch-size 4 --max-length 64
run grpo grpo --reward-model "$WORK/rm" --policy "$WORK/policy" --prompts "$WORK/prompts.jsonl" -o "$WORK/grpo" --steps 3 \
              --num-generations 4 --batch-size 8 --max-completion-length 8
"$PY" -m app.cli models list --kind policy --json > "$WORK/models.json" 2>/dev/null && echo "registered policies: $(cat "$WORK/models.json" | head -c 400)"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
