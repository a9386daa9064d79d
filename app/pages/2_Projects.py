"""Projects: create a project, edit its settings and guidelines, import a JSONL or Parquet file, see completion.

An upload goes through annotation.io.import_file, the same code and the same errors as
`rlhf import`; the upload is saved under its own file name first so that errors name it. A
datasets directory (save_to_disk) is a folder of files, which a browser upload cannot carry: the
page says to use `rlhf import DIR` for it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from app.ui import get_engine, no_remote_images, page_user, user_caption

user = page_user("researcher")

from annotation.browse import list_projects  # noqa: E402  (after the role check)
from annotation.errors import AnnotationError  # noqa: E402
from annotation.io.formats import FORMATS  # noqa: E402
from annotation.projects import new_project, save_project_settings, summaries as project_summaries  # noqa: E402
from annotation.selection import SELECTIONS, queue_preview  # noqa: E402
from annotation.store import CHOICES  # noqa: E402
from app.jobs import queue_rescore  # noqa: E402
from app.settings import get_settings  # noqa: E402

IMPORT_FORMATS = ["auto", *FORMATS]
CHOICE_LABELS = {"a": "A better", "b": "B better", "tie": "Tie", "both_bad": "Both bad"}

engine = get_engine()

st.title("Projects")
user_caption(user)


def _criteria(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _import_upload(project_name: str, upload, fmt: str) -> None:
    # The file keeps the uploaded name (in a private temp dir) so the import's errors name the
    # file the researcher knows; the temp dir is cut from messages, it means nothing to them.
    with tempfile.TemporaryDirectory(prefix="rlhf-upload-") as tmp:
        path = Path(tmp) / (Path(upload.name).name or "upload.jsonl")
        path.write_bytes(upload.getvalue())
        from annotation.io import import_file

        try:
            report = import_file(
                engine, path, project_name, format=fmt, created_by=user.id,
                max_field_chars=get_settings().max_field_chars,
            )
        except AnnotationError as exc:
            st.session_state["proj_import_result"] = ("error", str(exc).replace(f"{tmp}/", ""))
            return
    summary = dataclasses.asdict(report)
    summary["path"] = path.name
    summary["score_job"] = queue_rescore(engine, project_name, created_by=user.id) if report.items_added else None
    st.session_state["proj_import_result"] = ("success", summary)


# ----------------------------------------------------------------------------- overview

summaries = project_summaries(engine)
if summaries:
    table = pd.DataFrame(summaries)[["name", "overlap", "selection", "items", "prompts", "annotations", "items_complete", "completion"]]
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={"completion": st.column_config.ProgressColumn("completion", min_value=0.0, max_value=1.0, format="percent")},
    )
else:
    st.info("No projects yet: create the first one below.")

if "proj_flash" in st.session_state:
    st.success(st.session_state.pop("proj_flash"))

create_tab, edit_tab, import_tab = st.tabs(["Create", "Edit settings", "Import data"])

# ----------------------------------------------------------------------------- create

with create_tab:
    with st.form("proj_create", clear_on_submit=False):
        name = st.text_input("Name", key="proj_new_name")
        overlap = st.number_input("Annotations wanted per item (overlap k)", min_value=1, max_value=50, value=3, key="proj_new_k")
        choices = st.multiselect("Choices annotators may give", list(CHOICES), default=list(CHOICES),
                                 format_func=CHOICE_LABELS.get, key="proj_new_choices")
        criteria = st.text_input("Criteria (comma-separated, optional)", placeholder="helpfulness, harmlessness, honesty",
                                 key="proj_new_criteria")
        gold_rate = st.number_input("Gold item rate", min_value=0.0, max_value=0.99, value=0.0, step=0.05, key="proj_new_gold")
        lease = st.number_input("Lease (seconds an item stays with one annotator)", min_value=10, value=600, key="proj_new_lease")
        guidelines = st.text_area("Guidelines (markdown)", height=160, key="proj_new_guidelines")
        if st.form_submit_button("Create project", type="primary"):
            try:
                new_project(engine, name, overlap=int(overlap), guidelines=guidelines, choices=choices,
                            criteria=_criteria(criteria), gold_rate=float(gold_rate), lease_seconds=int(lease),
                            created_by=user.id)
            except AnnotationError as exc:
                st.error(str(exc))
            else:
                st.session_state["proj_selected"] = name.strip()
                st.session_state["proj_flash"] = f"Project '{name.strip()}' created."
                st.rerun()

projects = list_projects(engine)
names = [p.name for p in projects]
if not names:
    st.stop()
if st.session_state.get("proj_selected") not in names:
    st.session_state["proj_selected"] = names[0]

# ----------------------------------------------------------------------------- edit

with edit_tab:
    selected = st.selectbox("Project", names, key="proj_selected")
    project = next(p for p in projects if p.name == selected)
    with st.form(f"proj_edit_{project.id}"):
        e_overlap = st.number_input("Overlap k", min_value=1, max_value=50, value=project.overlap)
        e_choices = st.multiselect("Choices", list(CHOICES), default=list(project.choices), format_func=CHOICE_LABELS.get)
        e_criteria = st.text_input("Criteria (comma-separated)", value=", ".join(project.criteria))
        e_gold = st.number_input("Gold item rate", min_value=0.0, max_value=0.99, value=float(project.gold_rate), step=0.05)
        e_lease = st.number_input("Lease seconds", min_value=10, value=int(project.lease_seconds))
        c1, c2 = st.columns(2)
        e_selection = c1.selectbox(
            "Next item", SELECTIONS, index=SELECTIONS.index(project.selection),
            format_func={"random": "random (import order)", "uncertainty": "uncertainty (least sure first)"}.get,
            help="uncertainty: the items the project's active reward model is least sure of go first, scored by a "
                 "job when a model is activated or items arrive (an ensemble: where its members disagree most).")
        e_share = c2.number_input("Random share (uncertainty)", min_value=0.0, max_value=1.0, value=float(project.random_share),
                                  step=0.05, help="Share of items handed out at random anyway, for calibration.")
        e_suggestions = st.checkbox(
            "Show the reward model's suggestion to annotators", value=bool(project.suggestions),
            help="Off by default: a suggestion biases labels. When on, each answer records the suggestion shown.")
        e_guidelines = st.text_area("Guidelines (markdown)", value=project.guidelines, height=200)
        if st.form_submit_button("Save settings", type="primary"):
            try:
                save_project_settings(engine, project.id, overlap=int(e_overlap), choices=e_choices,
                                      criteria=_criteria(e_criteria), gold_rate=float(e_gold), lease_seconds=int(e_lease),
                                      guidelines=e_guidelines, selection=e_selection, random_share=float(e_share),
                                      suggestions=bool(e_suggestions))
                score_job = queue_rescore(engine, project.name, created_by=user.id)  # None unless the project uses scores
            except AnnotationError as exc:
                st.error(str(exc))
            else:
                st.success("Settings saved." + (f" Job {score_job} will score the project with its active reward model."
                                                if score_job else ""))
    if project.selection == "uncertainty":
        with st.expander("Queue: the next items within the current completion level"):
            preview = queue_preview(engine, project.name)
            if preview["uncertainty"].isna().all():
                st.info("Not scored yet: activate a reward model for this project (Reward models page), or run "
                        "`rlhf project score NAME`; until then items go in import order.")
            st.dataframe(preview, hide_index=True, width="stretch")
    with st.expander("Guidelines as annotators see them"):
        st.markdown(no_remote_images(project.guidelines or "_No guidelines yet._"))

# ----------------------------------------------------------------------------- import

with import_tab:
    target = st.selectbox("Import into project", names, key="proj_import_target")
    fmt = st.selectbox("Format", IMPORT_FORMATS, key="proj_import_format",
                       help="auto detects items (two responses to compare), ranking items, TRL (standard or conversational), HH-RLHF and UltraFeedback data; "
                            "prompts imports prompts only.")
    upload = st.file_uploader("JSONL or Parquet file", type=["jsonl", "json", "parquet"], key="proj_upload",
                              help="A datasets directory (save_to_disk) cannot be uploaded: import it with `rlhf import DIR --project NAME`.")
    if st.button("Import", type="primary", disabled=upload is None, key="proj_import"):
        _import_upload(target, upload, fmt)
    result = st.session_state.get("proj_import_result")
    if result:
        kind, payload = result
        if kind == "error":
            st.error(f"Import failed, nothing was added: {payload}")
        else:
            st.success(
                f"Imported {payload['path']}: {payload['items_added']} items, {payload['prompts_added']} prompts, "
                f"{payload['annotations_added']} annotations added; {payload['duplicates']} duplicates unchanged."
                + (f" Job {payload['score_job']} will score the new items for the uncertainty queue." if payload.get("score_job") else "")
            )
            st.json(payload, expanded=False)
