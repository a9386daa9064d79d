"""PPO: start a run as a job, follow its reward and KL live, read its warnings and sample
responses, see the registered policies, and let a policy write the next round's items.

Runs go through the same job queue and worker as reward training (`rlhf worker` must be
running). The page only reads run files through ppo.runs and submits jobs through app.jobs.
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from app.ui import get_engine, job_panel, page_user, user_caption

user = page_user("researcher")

from annotation.browse import list_projects  # noqa: E402  (after the role check)
from annotation.errors import AnnotationError  # noqa: E402
from annotation.registry import POLICY_METRICS, model_rows  # noqa: E402
from app.jobs import job_run_dir, list_jobs, log_tail, submit_job  # noqa: E402
from app.settings import get_settings  # noqa: E402
from ppo.errors import PPOError  # noqa: E402
from ppo.memory import ACCOUNTINGS, ALGOS, GPU_COUNTS, PRECISIONS, MemorySpec, plan_memory, plan_rows, plan_summary  # noqa: E402
from ppo.prompts import save_uploaded_prompts  # noqa: E402
from ppo.runs import curve_rows, job_run_dir as ppo_run_dir, judge_curve_rows, read_config, read_metrics, read_samples, run_warnings  # noqa: E402
from ppo.sft import DEFAULT_POLICY  # noqa: E402
from ppo.train import PPOConfig, check_judges, field_docs  # noqa: E402

engine = get_engine()
settings = get_settings()


st.title("PPO")
user_caption(user)

policies = model_rows(engine, kind="policy")
reward_models = [(m["id"], m["name"], m["path"], m["active"]) for m in model_rows(engine, kind="reward")]
projects = [p.name for p in list_projects(engine)]
default_policy = str(settings.model_dir / DEFAULT_POLICY)
policy_choices = {f"{DEFAULT_POLICY} (default)": default_policy} | {f"{m['name']} (#{m['id']})": m["path"] for m in policies}

if "ppo_flash" in st.session_state:
    st.success(st.session_state.pop("ppo_flash"))

start_tab, runs_tab, policies_tab, generate_tab = st.tabs(["Start a run", "Runs", "Policies", "Generate items"])

# ----------------------------------------------------------------------------- start a run

with start_tab:
    if not reward_models:
        st.info("No reward model is registered yet: train one on the Reward Models page or with `rlhf train-rm` first.")
    else:
        defaults, docs = PPOConfig(), field_docs()
        reward_choices = {f"{name} (#{id_}){' — active' if active else ''}": path for id_, name, path, active in reward_models}
        # Outside the form, so that the judges offered below are the other reward models.
        reward_label = st.selectbox("Reward model", list(reward_choices), key="ppo_reward")
        with st.form("ppo_start"):
            policy_label = st.selectbox("Policy to train", list(policy_choices), key="ppo_policy")
            judge_labels = st.multiselect(
                "Judges: reward models PPO does not train on, scoring held-out prompts (optional)",
                [label for label in reward_choices if label != reward_label], key="ppo_judges",
                help=docs["judge_every"])
            keep_best = st.selectbox("Keep", ["last", "judge"], key="ppo_keep_best", help=docs["keep_best"])
            prompts_project = st.selectbox("Prompts from project", projects, key="ppo_prompts_project") if projects else None
            # An upload, not a server path: a path typed here would let the worker read any file on the server.
            prompts_upload = st.file_uploader("…or upload a prompts file (JSONL)", type=["jsonl"], key="ppo_prompts_upload")
            c1, c2, c3 = st.columns(3)
            steps = c1.number_input("steps", 1, 100_000, defaults.steps, key="ppo_steps")
            batch_size = c2.number_input("batch_size", 1, 4096, defaults.batch_size, key="ppo_batch_size")
            mini_batch_size = c3.number_input("mini_batch_size", 1, 4096, defaults.mini_batch_size, key="ppo_mini_batch_size")
            learning_rate = c1.number_input("learning_rate", 0.0, 1.0, defaults.learning_rate, format="%.2e", key="ppo_lr")
            init_kl_coef = c2.number_input("init_kl_coef", 0.0, 10.0, defaults.init_kl_coef, format="%.3f", key="ppo_kl_coef")
            target = c3.number_input("KL target (nats)", 0.01, 1000.0, defaults.target, key="ppo_target")
            max_new_tokens = c1.number_input("max_new_tokens", 1, 4096, defaults.max_new_tokens, key="ppo_max_new_tokens")
            temperature = c2.number_input("temperature", 0.01, 5.0, defaults.temperature, key="ppo_temperature")
            lora = c3.checkbox("LoRA (reference = adapters off)", value=defaults.lora, key="ppo_lora")
            run_name = st.text_input("Name of the resulting policy (optional)", key="ppo_name")
            submitted = st.form_submit_button("Start PPO run", type="primary")
        if submitted:
            params = {"policy": policy_choices[policy_label], "reward_model": reward_choices[reward_label],
                      "steps": int(steps), "batch_size": int(batch_size), "mini_batch_size": int(mini_batch_size),
                      "learning_rate": float(learning_rate), "init_kl_coef": float(init_kl_coef), "target": float(target),
                      "max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "lora": bool(lora)}
            if prompts_upload is not None:
                params["prompts_upload"] = prompts_upload
            elif prompts_project:
                params["prompts_project"] = prompts_project
            if run_name.strip():
                params["name"] = run_name.strip()
            if judge_labels:
                params["judges"] = [reward_choices[label] for label in judge_labels]
            if keep_best != defaults.keep_best:
                params["keep_best"] = keep_best
            try:
                config = PPOConfig.from_dict({k: v for k, v in params.items() if k in PPOConfig.__dataclass_fields__}).validate()
                check_judges(config, params["reward_model"], params.get("judges", []))
                if "prompts_upload" not in params and "prompts_project" not in params:
                    raise PPOError("choose a project or upload a prompts file to take prompts from")
                if "prompts_upload" in params:
                    upload = params.pop("prompts_upload")
                    params["prompts"] = str(save_uploaded_prompts(Path(settings.runs_dir) / "uploads", upload.name,
                                                                  upload.getvalue()))
                job_id = submit_job(engine, "ppo", params, created_by=user.id)
            except (PPOError, AnnotationError) as exc:
                st.error(str(exc))
            else:
                st.session_state["ppo_flash"] = f"PPO run queued as job {job_id}; follow it on the Runs tab."
                st.session_state["ppo_job"] = job_id
                st.rerun()

    with st.expander("Plan memory for a larger run"):
        st.caption("Memory per GPU for PPO, DPO or GRPO past one machine: the same numbers as `rlhf plan-memory`.")
        m1, m2, m3 = st.columns(3)
        plan_algo = m1.selectbox("Algorithm", ALGOS, key="plan_algo")
        plan_size = m2.text_input("Model size", MemorySpec.model_size, key="plan_size", help=MemorySpec.help("model_size"))
        plan_precision = m3.selectbox("Precision", PRECISIONS, key="plan_precision", help=MemorySpec.help("precision"))
        plan_zero = m1.selectbox("ZeRO stage (3 = FSDP full shard)", [0, 1, 2, 3], key="plan_zero", help=MemorySpec.help("zero"))
        plan_gpus = m2.selectbox("GPUs", GPU_COUNTS, key="plan_gpus", help=MemorySpec.help("gpus"))
        plan_accounting = m3.selectbox("Accounting", ACCOUNTINGS, key="plan_accounting", help=MemorySpec.help("accounting"))
        plan_seq_len = m1.number_input("Sequence length", 1, 1_000_000, MemorySpec.seq_len, key="plan_seq_len")
        plan_micro_batch = m2.number_input("Micro-batch", 1, 4096, MemorySpec.micro_batch, key="plan_micro_batch")
        plan_lora = m3.checkbox("LoRA", key="plan_lora", help=MemorySpec.help("lora"))
        plan_checkpointing = m3.checkbox("Gradient checkpointing", key="plan_checkpointing", help=MemorySpec.help("grad_checkpointing"))
        try:
            plan = plan_memory(MemorySpec(algo=plan_algo, model_size=plan_size, precision=plan_precision, lora=plan_lora,
                                          zero=int(plan_zero), gpus=int(plan_gpus), grad_checkpointing=plan_checkpointing,
                                          seq_len=int(plan_seq_len), micro_batch=int(plan_micro_batch),
                                          accounting=plan_accounting))
        except PPOError as exc:
            st.error(str(exc))
        else:
            st.dataframe(pd.DataFrame(plan_rows(plan)).round(2), hide_index=True)
            st.caption(plan_summary(plan))

# ----------------------------------------------------------------------------- runs


def _run_view(job_id: int) -> None:
    job = job_panel(job_id, cancel_key=f"ppo_cancel_{job_id}", cancel_label="Cancel this run")
    if job is None:
        return
    run_dir = ppo_run_dir(job_run_dir(settings, job_id))
    history = read_metrics(run_dir)
    if not history:
        st.info("No PPO step logged yet." if job["status"] in ("queued", "running") else "This run logged no steps.")
    else:
        last = history[-1]
        cols = st.columns(4)
        cols[0].metric("step", last["step"])
        cols[1].metric("reward", f"{last['reward_mean']:.3f}", f"{last['reward_mean'] - history[0]['reward_mean']:+.3f}")
        cols[2].metric("KL (nats)", f"{last['kl']:.2f}")
        cols[3].metric("KL coefficient", f"{last.get('kl_coef', float('nan')):.3f}")
        frame = pd.DataFrame(curve_rows(history))
        config = read_config(run_dir)
        reward_chart = (alt.Chart(frame[frame.metric == "reward_mean"]).mark_line(point=True)
                        .encode(x="step:Q", y=alt.Y("value:Q", title="reward (mean)")).properties(title="Reward", height=220))
        kl_chart = (alt.Chart(frame[frame.metric == "kl"]).mark_line(point=True, color="#d62728")
                    .encode(x="step:Q", y=alt.Y("value:Q", title="KL to reference (nats)")).properties(title="KL", height=220))
        if config is not None:
            target_rule = alt.Chart(pd.DataFrame({"target": [config.target]})).mark_rule(strokeDash=[4, 4]).encode(y="target:Q")
            kl_chart = kl_chart + target_rule
        left, right = st.columns(2)
        left.altair_chart(reward_chart, width="stretch")
        right.altair_chart(kl_chart, width="stretch")
        judged = pd.DataFrame(judge_curve_rows(history))
        if not judged.empty:
            # Gao et al.'s over-optimisation curve: the proxy keeps rising with KL, a judge peaks and falls.
            # Each on its own axis: the proxy and the judges score on different scales.
            base = alt.Chart(judged).encode(x=alt.X("kl:Q", title="KL to reference (nats, held-out prompts)"),
                                            tooltip=["step:Q", "metric:N", "value:Q", "kl:Q"])
            proxy_line = (base.transform_filter(alt.datum.metric == "proxy_reward_heldout").mark_line(point=True)
                          .encode(y=alt.Y("value:Q", title="proxy reward (held-out)")))
            judge_line = (base.transform_filter(alt.datum.metric == "judge_reward").mark_line(point=True, color="#2ca02c")
                          .encode(y=alt.Y("value:Q", title="judges' reward (held-out)")))
            st.altair_chart(alt.layer(proxy_line, judge_line).resolve_scale(y="independent")
                            .properties(title="Over-optimisation: proxy (blue) and judges (green) against KL", height=260),
                            width="stretch")
        warnings = run_warnings(run_dir, history)
        for w in warnings:
            st.warning(f"step {w['step']} — {w['message']}. Suggested: {w['suggestion']}")
        if not warnings:
            st.caption("No diagnostic warnings so far.")
        samples = read_samples(run_dir)
        if samples:
            st.subheader("Sample responses")
            st.dataframe(pd.DataFrame([{"step": s.get("step"), "prompt": str(s.get("prompt")), "response": s.get("response"),
                                        "score": s.get("score"), "ended with EOS": s.get("ended_with_eos")} for s in samples]),
                         hide_index=True, width="stretch")
    with st.expander("Job log"):
        st.code(log_tail(job) or "(empty)", language=None)


with runs_tab:
    jobs = list_jobs(engine, kind="ppo", limit=50)
    if not jobs:
        st.info("No PPO runs yet: start one on the first tab.")
    else:
        st.dataframe(pd.DataFrame([{k: j[k] for k in ("id", "status", "progress", "message", "created_by_name", "created_at")}
                                   for j in jobs]),
                     hide_index=True, width="stretch",
                     column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)})
        ids = [j["id"] for j in jobs]
        preferred = st.session_state.get("ppo_job")
        job_id = st.selectbox("Run", ids, index=ids.index(preferred) if preferred in ids else 0, key="ppo_run_select")
        live = next(j for j in jobs if j["id"] == job_id)["status"] in ("queued", "running")
        # A running job's view reruns on its own every few seconds; a finished one is drawn once.
        st.fragment(_run_view, run_every=5 if live else None)(job_id)

# ----------------------------------------------------------------------------- registered policies

with policies_tab:
    if not policies:
        st.info("No policy is registered yet: `rlhf sft`, `rlhf ppo` and the jobs from this page register theirs.")
    else:
        st.dataframe(pd.DataFrame([{"id": m["id"], "name": m["name"], "path": m["path"], "base model": m["base_model"],
                                    "parent": m["parent_id"], "created": m["created_at"], **{k: m[k] for k in POLICY_METRICS}}
                                   for m in policies]), hide_index=True, width="stretch")

# ----------------------------------------------------------------------------- generate items (iterated RLHF)

with generate_tab:
    st.caption("Let a policy answer a project's prompts twice (or two policies once each): the pairs become new items "
               "to annotate, so the next round of preference data comes from the current model.")
    if not projects:
        st.info("No project to take prompts from yet.")
    else:
        with st.form("ppo_generate"):
            gen_policy = st.selectbox("Policy", list(policy_choices), key="gen_policy")
            gen_policy_b = st.selectbox("Second policy (optional)", ["(two samples from the first)"] + list(policy_choices),
                                        key="gen_policy_b")
            gen_source = st.selectbox("Prompts from project", projects, key="gen_source")
            gen_target = st.text_input("New items go to project (created if missing)", key="gen_target")
            c1, c2 = st.columns(2)
            gen_n = c1.number_input("prompts (at most)", 1, 100_000, 50, key="gen_n")
            gen_temperature = c2.number_input("temperature", 0.01, 5.0, 1.0, key="gen_temperature")
            gen_submit = st.form_submit_button("Generate items")
        if gen_submit:
            if not gen_target.strip():
                st.error("name the project that receives the new items")
            else:
                params = {"policy": policy_choices[gen_policy], "prompts_project": gen_source, "project": gen_target.strip(),
                          "n": int(gen_n), "temperature": float(gen_temperature)}
                if gen_policy_b in policy_choices:
                    params["policy_b"] = policy_choices[gen_policy_b]
                job_id = submit_job(engine, "generate", params, created_by=user.id)
                st.session_state["ppo_flash"] = f"generation queued as job {job_id}; its items appear in '{params['project']}' when it is done."
                st.rerun()
