"""Reward models: versions side by side, their training curve, calibration and length bias, retraining.

"Retrain reward model" queues a train_rm job (the worker, `rlhf worker`, runs it); the job's
progress bar and log tail refresh on their own while it runs, and it can be cancelled. A finished
job registers its model here; "Make active" picks the project's reward model for PPO.
"""

from __future__ import annotations

import streamlit as st

from app.ui import get_engine, job_panel, page_user

user = page_user("researcher")

import altair as alt  # noqa: E402  (after the role check: nothing runs for a refused user)
import pandas as pd  # noqa: E402

from annotation.browse import list_projects  # noqa: E402
from annotation.errors import AnnotationError  # noqa: E402
from annotation.registry import activate, model_rows, run_files  # noqa: E402
from app.jobs import list_jobs, log_tail, queue_rescore, submit_job  # noqa: E402
from reward.train import TrainParams  # noqa: E402

engine = get_engine()
st.title("Reward models")

projects = list_projects(engine)
if not projects:
    st.info("No projects yet: create one on the Projects page and collect annotations first.")
    st.stop()
names = [p.name for p in projects]
project_name = st.selectbox("Project", names, key="rm_project")
project = projects[names.index(project_name)]

# ----------------------------------------------------------------------------- retrain

DEFAULTS = TrainParams()

with st.expander("Retrain reward model", expanded=False):
    with st.form("retrain"):
        c1, c2, c3 = st.columns(3)
        base = c1.selectbox("Base", ["minilm", "smollm2"], help="minilm is fast on CPU; smollm2 is a 135M causal LM.")
        epochs = c2.number_input("Epochs", 0.5, 20.0, float(DEFAULTS.epochs), step=0.5)
        lr = c3.number_input("Learning rate", 1e-6, 1e-2, DEFAULTS.lr, format="%.1e")
        c4, c5, c6 = st.columns(3)
        max_length = c4.number_input("Max tokens", 32, 2048, DEFAULTS.max_length, step=32)
        ensemble = c5.number_input("Ensemble members", 1, 8, 1)
        aggregation = c6.selectbox("Aggregation", ["majority", "dawid-skene"])
        margin = st.checkbox("Use aggregation confidence as margin")
        lora = st.checkbox("LoRA (for large bases)")
        if st.form_submit_button("Retrain reward model", type="primary"):
            params = {"project": project.name, "base": base, "epochs": float(epochs), "lr": float(lr),
                      "max_length": int(max_length), "ensemble": int(ensemble), "aggregation": aggregation,
                      "margin": bool(margin), "lora": bool(lora)}
            try:
                st.session_state["rm_job"] = submit_job(engine, "train_rm", params, created_by=user.id)
                st.success(f"queued job {st.session_state['rm_job']}; `rlhf worker` runs it")
            except AnnotationError as exc:
                st.error(str(exc))

# ----------------------------------------------------------------------------- the running job


def _job_view(job_id: int) -> None:
    job = job_panel(job_id, cancel_key=f"rm_cancel_{job_id}")
    if job is None:
        return
    st.code(log_tail(job, 25) or "(no log yet)", language=None)


jobs = [j for j in list_jobs(engine, kind="train_rm", limit=20) if (j["params"] or {}).get("project") == project.name]
if jobs:
    st.subheader("Training jobs")
    ids = [j["id"] for j in jobs]
    default = ids.index(st.session_state["rm_job"]) if st.session_state.get("rm_job") in ids else 0
    job_id = st.selectbox("Job", ids, index=default,
                          format_func=lambda i: next(f"#{j['id']} {j['status']} {j['created_at']}" for j in jobs if j["id"] == i))
    live = next(j for j in jobs if j["id"] == job_id)["status"] in ("queued", "running")
    # A queued or running job's view reruns on its own every few seconds; a finished one is drawn once.
    st.fragment(_job_view, run_every=3 if live else None)(job_id)

# ----------------------------------------------------------------------------- versions

rows = model_rows(engine, project_id=project.id)
st.subheader("Versions")
if not rows:
    st.info("No reward model registered for this project yet.")
    st.stop()
table = pd.DataFrame(rows)
st.dataframe(table[["id", "active", "name", "base_model", "eval_accuracy", "eval_log_loss", "eval_ece", "eval_mean_margin",
                    "train_loss", "data_rows", "epochs", "lr", "ensemble", "parent_id", "data_hash", "created_at"]],
             hide_index=True, use_container_width=True,
             column_config={"active": st.column_config.CheckboxColumn("active")})

chosen = st.multiselect("Compare", [r["id"] for r in rows], default=[r["id"] for r in rows[:2]],
                        format_func=lambda i: next(f"#{r['id']} {r['name']}" for r in rows if r["id"] == i))
pick = st.selectbox("Make active", [r["id"] for r in rows], format_func=lambda i: next(
    f"#{r['id']} {r['name']}{' (active)' if r['active'] else ''}" for r in rows if r["id"] == i))
if st.session_state.get("rm_flash"):
    st.success(st.session_state.pop("rm_flash"))
if st.button("Make active"):
    try:
        model_project = activate(engine, pick)
        score_job = queue_rescore(engine, model_project, created_by=user.id) if model_project else None
    except AnnotationError as exc:
        st.error(str(exc))
    else:
        st.session_state["rm_flash"] = f"Model #{pick} is now the active reward model." + (
            f" Job {score_job} will order the annotation queue by it (uncertainty selection)." if score_job else "")
        st.rerun()

curves, calib, length = [], [], []
for r in rows:
    if r["id"] not in chosen:
        continue
    files = run_files(r["path"])
    label = f"#{r['id']} {r['name']}"
    curves += [{"model": label, "step": row["step"], "loss": row["loss"]} for row in files["curve"]
               if "loss" in row and "step" in row]
    ev = files["metrics"].get("eval") or {}
    calib += [{**b, "model": label} for b in ev.get("calibration", []) if b["count"]]
    lb = ev.get("length_bias") or {}
    for side in ("chosen_longer", "chosen_shorter"):
        if (lb.get(side) or {}).get("accuracy") is not None:
            length.append({"model": label, "case": side.replace("_", " "), "accuracy": lb[side]["accuracy"],
                           "pairs": lb[side]["n_pairs"]})

col1, col2 = st.columns(2)
with col1:
    st.markdown("**Training curve** (Bradley-Terry loss)")
    if curves:
        st.altair_chart(alt.Chart(pd.DataFrame(curves)).mark_line().encode(x="step:Q", y="loss:Q", color="model:N"),
                        use_container_width=True)
    else:
        st.caption("no training curve recorded")
with col2:
    st.markdown("**Calibration** (held-out pairs; the diagonal is perfect)")
    if calib:
        df = pd.DataFrame(calib)
        diag = alt.Chart(pd.DataFrame({"x": [0.5, 1.0], "y": [0.5, 1.0]})).mark_line(strokeDash=[4, 4], color="gray")
        pts = alt.Chart(df).mark_line(point=True).encode(
            x=alt.X("confidence:Q", scale=alt.Scale(domain=[0.5, 1.0])), y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])),
            color="model:N", tooltip=["model", "lo", "hi", "count", "confidence", "accuracy"])
        st.altair_chart(diag.encode(x="x:Q", y="y:Q") + pts, use_container_width=True)
    else:
        st.caption("no held-out evaluation recorded")

st.markdown("**Length bias**: held-out accuracy when the chosen response is the longer vs the shorter one")
if length:
    st.altair_chart(alt.Chart(pd.DataFrame(length)).mark_bar().encode(
        x=alt.X("case:N", title=None), y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color="model:N",
        xOffset="model:N", tooltip=["model", "case", "accuracy", "pairs"]), use_container_width=True)
else:
    st.caption("no held-out evaluation recorded")
