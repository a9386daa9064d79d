"""Data: browse and filter a project's items and annotations, set gold answers, download an export.

Downloads are made by annotation.io.export, the same code as `rlhf export`, into a temp file whose
bytes go to the download button.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
from pathlib import Path

import streamlit as st

from app.ui import escape_markdown, get_engine, page_user, project_picker, user_caption

user = page_user("researcher")

from annotation import assign  # noqa: E402  (after the role check)
from annotation.browse import annotations_frame, annotator_names, chat_turns, item_detail, items_frame, list_projects  # noqa: E402
from annotation.errors import AnnotationError  # noqa: E402
from annotation.io import EXPORT_FORMATS, export  # noqa: E402

ROW_LIMIT = 500
ANY = "(any)"

engine = get_engine()

st.title("Data")
user_caption(user)

project = project_picker(list_projects(engine), "data_project", "No projects yet: create one on the Projects page.")

items_tab, annotations_tab, export_tab = st.tabs(["Items", "Annotations", "Export"])

# ----------------------------------------------------------------------------- items

with items_tab:
    f1, f2, f3, f4 = st.columns(4)
    search = f1.text_input("Search text", key="data_search")
    status = f2.selectbox("Annotations", [ANY, "none yet", "in progress", f"complete (≥ {project.overlap})"], key="data_status")
    flagged = f3.selectbox("Flags", [ANY, "flagged", "not flagged"], key="data_flagged")
    gold = f4.selectbox("Gold", [ANY, "gold only", "not gold"], key="data_gold")
    bounds = {ANY: (None, None), "none yet": (None, 0), "in progress": (1, project.overlap - 1)}.get(status, (project.overlap, None))
    frame, total = items_frame(
        engine, project.id, search=search or None, min_annotations=bounds[0], max_annotations=bounds[1],
        flagged={ANY: None, "flagged": True, "not flagged": False}[flagged],
        gold={ANY: None, "gold only": True, "not gold": False}[gold],
        limit=ROW_LIMIT,
    )
    st.caption(f"{total} items match" + (f"; showing the first {ROW_LIMIT}" if total > ROW_LIMIT else ""))
    st.dataframe(frame, hide_index=True, width="stretch", key="data_items_table")

    if not frame.empty:
        item_id = st.selectbox("Open item", frame["item_id"].tolist(), key="data_item_id")
        detail = item_detail(engine, project.id, int(item_id))
        with st.container(border=True):
            st.markdown(f"**Item {detail['item_id']}**"
                        + (f" · external id {escape_markdown(detail['external_id'])}" if detail["external_id"] else ""))
            turns = chat_turns(detail["prompt"])
            if turns is None:
                st.text(str(detail["prompt"]))  # item text verbatim: no Markdown, no remote images
            else:
                for turn in turns:
                    with st.chat_message(turn["role"] if turn["role"] in ("user", "assistant") else "system"):
                        st.text(turn["content"])
            if detail["responses"] is not None:  # a ranking item: its responses in stored order
                for row_start in range(0, len(detail["responses"]), 2):
                    for col, (i, response) in zip(st.columns(2), list(enumerate(detail["responses"]))[row_start:row_start + 2]):
                        with col:
                            st.markdown(f"**Response {i + 1}** · source: {escape_markdown(response.get('source') or 'unknown')}")
                            st.text(response.get("text", ""))
            else:
                a_col, b_col = st.columns(2)
                with a_col:
                    st.markdown(f"**A** · source: {escape_markdown(detail['source_a'] or 'unknown')}")
                    st.text(detail["response_a"])
                with b_col:
                    st.markdown(f"**B** · source: {escape_markdown(detail['source_b'] or 'unknown')}")
                    st.text(detail["response_b"])
            if detail["flags"]:
                st.markdown("**Flags**")
                st.dataframe(detail["flags"], hide_index=True)
            item_annotations, _ = annotations_frame(engine, project.id, item_id=detail["item_id"])
            st.markdown(f"**Annotations** ({len(item_annotations)})")
            st.dataframe(item_annotations, hide_index=True, width="stretch")

            gold_options = [None] + list(project.choices)
            g1, g2 = st.columns([3, 1])
            new_gold = g1.selectbox(
                "Gold answer (known correct choice; gold items are mixed in to check annotators)", gold_options,
                index=gold_options.index(detail["gold_choice"]) if detail["gold_choice"] in gold_options else 0,
                format_func=lambda c: "not a gold item" if c is None else c, key=f"data_gold_{detail['item_id']}",
            )
            if g2.button("Save gold answer", key="data_gold_save"):
                try:
                    assign.set_gold(engine, detail["item_id"], new_gold)
                except AnnotationError as exc:
                    st.error(str(exc))
                else:
                    st.success("Gold answer saved.")

# ----------------------------------------------------------------------------- annotations

with annotations_tab:
    a1, a2 = st.columns(2)
    who = a1.selectbox("Annotator", [ANY] + annotator_names(engine, project.id), key="data_annotator")
    which = a2.selectbox("Choice", [ANY] + list(project.choices), key="data_choice")
    ann, ann_total = annotations_frame(
        engine, project.id, annotator=None if who == ANY else who, choice=None if which == ANY else which, limit=ROW_LIMIT,
    )
    st.caption(f"{ann_total} annotations match" + (f"; showing the first {ROW_LIMIT}" if ann_total > ROW_LIMIT else ""))
    st.metric("Annotations", ann_total)
    st.dataframe(ann, hide_index=True, width="stretch", key="data_annotations_table")

# ----------------------------------------------------------------------------- export

with export_tab:
    e1, e2, e3, e4, e5 = st.columns(5)
    fmt = e1.selectbox("Format", EXPORT_FORMATS, key="data_export_format")
    file_type = e5.selectbox("File", ["jsonl", "parquet"], key="data_export_file_type")
    aggregation = e2.selectbox("Aggregation", ["majority", "dawid-skene"], key="data_export_aggregation")
    min_agreement = e3.number_input("Minimum agreement", min_value=0.0, max_value=1.0, value=0.0, step=0.05, key="data_export_min_agreement")
    split = e4.selectbox("Split", ["all", "train", "test"], key="data_export_split")
    if st.button("Prepare export", type="primary", key="data_export_prepare"):
        filters = {"aggregation": aggregation}
        if min_agreement > 0:
            filters["min_agreement"] = float(min_agreement)
        if split != "all":
            filters["split"] = split
        # The browser's suggested name may come from the project name, made safe; the file on the
        # server never does (a name stored before names were checked could hold "../").
        safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", project.name).strip("._-") or f"project-{project.id}"
        file_name = f"{safe_name}-{fmt}.{file_type}"
        with tempfile.TemporaryDirectory(prefix="rlhf-export-") as tmp:
            out = Path(tmp) / f"export.{file_type}"
            try:
                report = export(engine, project.name, fmt, out, **filters)
            except AnnotationError as exc:
                st.session_state.pop("data_export", None)
                st.error(str(exc))
            else:
                st.session_state["data_export"] = {
                    "project": project.name, "file_name": file_name, "data": out.read_bytes(),
                    "report": dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report),
                }
    prepared = st.session_state.get("data_export")
    if prepared and prepared["project"] == project.name:
        report = {k: v for k, v in prepared["report"].items() if k != "path"}
        st.success(f"{prepared['file_name']} is ready ({len(prepared['data']):,} bytes).")
        st.json(report, expanded=False)
        st.download_button(
            f"Download {prepared['file_name']}", prepared["data"], file_name=prepared["file_name"],
            mime="application/vnd.apache.parquet" if prepared["file_name"].endswith(".parquet") else "application/jsonl", key="data_export_download", type="primary",
        )
