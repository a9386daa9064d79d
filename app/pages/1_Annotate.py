"""Annotate: compare two responses to a prompt, or rank 3 to 6 of them, keyboard first.

Keys (shown on the page): 1 left better, 2 right better, 3 tie, 4 both bad; Q/W/E strength;
Enter submit; S skip; B broken; U unsafe; Z undo the last submission; G guidelines.
Which response is on the left comes from the assignment (random per annotator and item) and is
recorded with the annotation; the page maps left/right back to A/B before saving.

A ranking item shows its responses numbered 1..n in the order its lease records (random per
annotator and item). Keys: the response numbers from best to worst; T before a number ties that
response with the previous one ("3 T 1 2 4": 3 and 1 share first place); Backspace takes back the
last key; Enter submits once every response is placed (the rest as above; Z still undoes the last
submission). The page turns the places into ranks in stored order (assign.ranks_from_groups).

Order matters for a ranking as it does not for a choice: keys that reach the server within one
rerun are merged by Streamlit and their callbacks run in the page's button order, not the order
typed. So when two ranking keys arrive together neither is applied (a warning asks to press them
again), and Enter arriving with a ranking key applies the key but does not submit: what is saved
is always a ranking the annotator has seen.

A pairwise answer behaves the same way: Enter merged with a choice or strength key is refused once
with a message, since the strength may not be applied yet. The choice and strength callbacks change
a plain object passed as their argument and never touch st.session_state: each session_state access
inside a callback is a point where Streamlit abandons the callback when the next key's request has
come in (streamlit 1.67), so a strength callback that read or wrote session_state could be cut off
under load and the strength lost with nothing shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import streamlit as st

from app.ui import REFUSED_MESSAGE, action_user, get_engine, no_remote_images, page_user, project_picker, user_caption

user = page_user("annotator", "researcher")

from annotation import assign  # noqa: E402  (after the role check: nothing runs for a refused user)
from annotation.browse import chat_turns, list_projects  # noqa: E402
from annotation.errors import AnnotationError  # noqa: E402

UNDO_WINDOW_S = 30
FAST_SUBMIT_S = 0.3  # an Enter this soon after the choice was drawn, with no strength, is refused once (_submit)
CHOICE_KEYS = {  # shown choice -> (key, label, choice when shown unswapped, when swapped)
    "left": ("1", "Response 1 better", "a", "b"),
    "right": ("2", "Response 2 better", "b", "a"),
    "tie": ("3", "Tie", "tie", "tie"),
    "both_bad": ("4", "Both bad", "both_bad", "both_bad"),
}
STRENGTH_KEYS = {1: ("Q", "Slight"), 2: ("W", "Clear"), 3: ("E", "Strong")}
CRITERION_OPTIONS = {"left": "Response 1", "right": "Response 2", "tie": "Tie", "both_bad": "Both bad"}
TIE_KEY, BACK_KEY = "T", "Backspace"
PLACES = ("1st", "2nd", "3rd", "4th", "5th", "6th")

engine = get_engine()
state = st.session_state


# ----------------------------------------------------------------------------- state helpers


@dataclass
class PairAnswer:
    """The answer to the pairwise item on screen, changed by the key callbacks (see the docstring)."""

    choice: str | None = None  # a CHOICE_KEYS key: the side as shown
    strength: int | None = None
    drawn_at: float | None = None  # when a run first finished drawing the current choice
    fast_refused: bool = False  # a too-fast Enter on this item was refused once already


def _reset_item_state() -> None:
    state["ann_answer"] = PairAnswer()
    state["ann_rank_keys"] = []  # a ranking item's keys so far: "1".."6" and TIE_KEY


def _rank_groups(keys: list[str]) -> tuple[list[list[int]], bool]:
    """The tied groups of shown positions (0-based) the keys placed, best first, and whether a tie
    key waits for its response."""
    groups: list[list[int]] = []
    tie_next = False
    for key in keys:
        if key == TIE_KEY:
            tie_next = True
            continue
        if tie_next and groups:
            groups[-1].append(int(key) - 1)
        else:
            groups.append([int(key) - 1])
        tie_next = False
    return groups, tie_next


def _keys_from_ranks(ranks, shown_order) -> list[str]:
    keys: list[str] = []
    for group in assign.groups_from_ranks(ranks, shown_order):
        for i, position in enumerate(group):
            keys += ([TIE_KEY] if i else []) + [str(position + 1)]
    return keys


def _ranking_text(groups: list[list[int]], tie_next: bool) -> str:
    text = " > ".join(" = ".join(str(p + 1) for p in group) for group in groups)
    return text + (" = …" if tie_next else "")


def _drop_task() -> None:
    state.pop("ann_task", None)
    _reset_item_state()


def _to_ab(shown: str, swapped: bool) -> str:
    _key, _label, unswapped, when_swapped = CHOICE_KEYS[shown]
    return when_swapped if swapped else unswapped


def _criterion_options(project) -> list[str]:
    return [CRITERION_OPTIONS[c] for c in ("left", "right", "tie", "both_bad") if c in ("left", "right") or c in project.choices]


def _criterion_to_ab(value: str, swapped: bool) -> str:
    shown = next(c for c, label in CRITERION_OPTIONS.items() if label == value)
    return _to_ab(shown, swapped)


# ----------------------------------------------------------------------------- button callbacks
# Callbacks run before the page script, so before its page_user check: each one that writes checks
# the user again (action_user) and the store checks that the annotator is active.

ROLES = ("annotator", "researcher")


def _acting_user():
    acting = action_user(*ROLES)
    if acting is None:
        state["ann_flash"] = ("error", REFUSED_MESSAGE)
        _drop_task()
    return acting


def _choose(answer: PairAnswer, shown: str) -> None:
    answer.choice = shown
    answer.drawn_at = None  # set again once a run has drawn the new choice
    if shown in ("tie", "both_bad"):
        answer.strength = None


def _set_strength(answer: PairAnswer, level: int) -> None:
    # Kept even when no side is chosen yet (a fast "1 E Enter" can reach the server before the
    # rerun that showed the choice); a tie or both-bad choice drops it, and submit ignores it then.
    if answer.choice not in ("tie", "both_bad"):
        answer.strength = level


RANK_BUTTONS = tuple(f"ann_rank_{p}" for p in range(1, 7)) + ("ann_rank_tie", "ann_rank_back")


def _choice_keys_this_rerun() -> int:
    """How many choice and strength keys were merged into this rerun (see _rank_keys_this_rerun)."""
    keys = [f"ann_choice_{shown}" for shown in CHOICE_KEYS] + [f"ann_strength_{level}" for level in STRENGTH_KEYS]
    return sum(bool(state.get(key)) for key in keys)


def _rank_keys_this_rerun() -> int:
    # A button's state is True only in the rerun it was pressed, and callbacks run after every
    # widget's new state is in: this counts the ranking keys merged into this rerun.
    return sum(bool(state.get(key)) for key in RANK_BUTTONS)


def _keys_came_together() -> bool:
    if _rank_keys_this_rerun() <= 1:
        return False
    state["ann_flash"] = ("warning", "Keys arrived together, too fast to tell their order, and none was applied: "
                                     "press them again, one at a time.")
    return True


def _rank_place(position: int) -> None:
    """A response number pressed: place the response shown at `position` (0-based) next."""
    task = state.get("ann_task")
    if task is None or not task.is_ranking or position >= len(task.responses) or _keys_came_together():
        return
    keys = state.setdefault("ann_rank_keys", [])
    groups, _ = _rank_groups(keys)
    if any(position in group for group in groups):
        state["ann_flash"] = ("warning", f"Response {position + 1} is placed already; {BACK_KEY} takes back the last key.")
        return
    keys.append(str(position + 1))


def _rank_tie() -> None:
    """The tie key: the next response pressed shares the previous one's place."""
    task = state.get("ann_task")
    if task is None or not task.is_ranking or _keys_came_together():
        return
    keys = state.setdefault("ann_rank_keys", [])
    groups, tie_next = _rank_groups(keys)
    if not groups:
        state["ann_flash"] = ("warning", f"Place a response first; then {TIE_KEY} and a number put the next one beside it.")
    elif sum(map(len, groups)) == len(task.responses):
        state["ann_flash"] = ("warning", "Every response is placed; nothing is left to tie.")
    elif not tie_next:
        keys.append(TIE_KEY)


def _rank_back() -> None:
    keys = state.get("ann_rank_keys")
    if keys and not _keys_came_together():
        keys.pop()


def _submit_ranking(task, acting) -> None:
    if _rank_keys_this_rerun():
        if "ann_flash" not in state:
            state["ann_flash"] = ("info", "Enter arrived together with a ranking key: check the ranking, then press Enter again.")
        return
    groups, _ = _rank_groups(state.get("ann_rank_keys") or [])
    placed = {p for group in groups for p in group}
    missing = [str(p + 1) for p in range(len(task.responses)) if p not in placed]
    if missing:
        state["ann_flash"] = ("warning", f"Place every response first, best to worst; still to place: {', '.join(missing)}.")
        return
    rationale = (state.get(f"ann_rationale_{task.item_id}") or "").strip() or None
    duration_ms = int((time.monotonic() - state.get("ann_started", time.monotonic())) * 1000)
    try:
        assign.submit_ranking(engine, acting.id, task.item_id, assign.ranks_from_groups(groups, task.shown_order),
                              rationale=rationale, duration_ms=duration_ms)
    except AnnotationError as exc:
        state["ann_flash"] = ("error", f"Not saved: {exc}")
        _drop_task()
        return
    state["ann_flash"] = ("success", f"Saved. Press Z within {UNDO_WINDOW_S} s to undo.")
    _drop_task()


def _submit(project) -> None:
    task = state.get("ann_task")
    if task is None:
        return
    acting = _acting_user()
    if acting is None:
        return
    if task.is_ranking:
        _submit_ranking(task, acting)
        return
    answer = state["ann_answer"]
    shown = answer.choice
    if shown is None:
        state["ann_flash"] = ("warning", "Pick a choice first: 1, 2" + (", 3" if "tie" in project.choices else "")
                              + (", 4" if "both_bad" in project.choices else "") + ".")
        return
    # Keys typed faster than the page redraws go wrong in two ways, and each is refused once, with a
    # message; the next Enter saves. (1) Keys queued while a run is busy reach the server merged into
    # one rerun, whose callbacks run in widget order, not key order (the browser's merged request puts
    # the older key last): a strength typed just before this Enter may not be applied yet. (2) A key
    # pressed while the page redraws can be dropped by the browser: an Enter that comes before the
    # choice was drawn, or right after, with no strength, may have lost one on the way.
    if _choice_keys_this_rerun():
        answer.fast_refused = True
        state["ann_flash"] = ("warning", "Not saved yet: Enter arrived together with a choice or strength key. "
                              "Check your choice, then press Enter again.")
        return
    if (shown in ("left", "right") and answer.strength is None and not answer.fast_refused
            and (answer.drawn_at is None or time.monotonic() - answer.drawn_at < FAST_SUBMIT_S)):
        answer.fast_refused = True
        state["ann_flash"] = ("warning", "Not saved yet: Enter came right after the choice, with no strength. "
                              "Press Q/W/E for a strength, or Enter again to save without one.")
        return
    criteria = {}
    for name in project.criteria:
        value = state.get(f"ann_crit_{task.item_id}_{name}")
        if value:
            criteria[name] = _criterion_to_ab(value, task.shown_swapped)
    rationale = (state.get(f"ann_rationale_{task.item_id}") or "").strip() or None
    duration_ms = int((time.monotonic() - state.get("ann_started", time.monotonic())) * 1000)
    try:
        assign.submit(
            engine, acting.id, task.item_id, _to_ab(shown, task.shown_swapped),
            strength=answer.strength if shown in ("left", "right") else None,
            criteria=criteria, rationale=rationale, duration_ms=duration_ms,
        )
    except AnnotationError as exc:
        state["ann_flash"] = ("error", f"Not saved: {exc}")
        _drop_task()
        return
    state["ann_flash"] = ("success", f"Saved. Press Z within {UNDO_WINDOW_S} s to undo.")
    _drop_task()


def _report(action, message: str) -> None:
    try:
        action()
    except AnnotationError as exc:
        state["ann_flash"] = ("error", str(exc))
    else:
        state["ann_flash"] = ("info", message)


def _skip() -> None:
    task = state.get("ann_task")
    acting = _acting_user()
    if task is not None and acting is not None:
        _report(lambda: assign.skip(engine, acting.id, task.item_id), "Skipped.")
    _drop_task()


def _flag(kind: str) -> None:
    task = state.get("ann_task")
    acting = _acting_user()
    if task is not None and acting is not None:
        note = (state.get(f"ann_rationale_{task.item_id}") or "").strip() or None
        _report(lambda: assign.flag(engine, acting.id, task.item_id, kind, note=note),
                f"Flagged as {kind}. Thank you; a researcher will look at it.")
    _drop_task()


def _undo(project_id: int) -> None:
    acting = _acting_user()
    if acting is None:
        return
    try:
        undone = assign.undo_last(engine, acting.id, project_id, window_seconds=UNDO_WINDOW_S)
    except AnnotationError as exc:
        state["ann_flash"] = ("error", f"Could not undo: {exc}")
        return
    if undone is None:
        state["ann_flash"] = ("warning", f"Nothing to undo in this project: only your last submission here, within "
                                         f"{UNDO_WINDOW_S} s, can be undone.")
        return
    state["ann_flash"] = ("info", "Your last annotation was undone; that item is shown again with your earlier choice.")
    _drop_task()
    # The next run leases the same item back (it comes first); restore the answer given on it.
    state["ann_restore"] = undone


# ----------------------------------------------------------------------------- rendering


def _render_text(text: str) -> None:
    # Item text is judged as the model wrote it: st.text shows it verbatim (no Markdown, so no remote
    # images, LaTeX, colour directives, emoji shortcodes or typographic rewrites, and no HTML).
    st.text(text)


def _render_guidelines(text: str) -> None:
    # Guidelines are a researcher's Markdown; images are the one construct that fetches by itself.
    st.markdown(no_remote_images(text))


def _render_prompt(prompt) -> None:
    turns = chat_turns(prompt)
    if turns is None:
        with st.container(border=True):
            _render_text(str(prompt))
        return
    for turn in turns:
        role = turn["role"]
        avatar = {"user": ":material/person:", "assistant": ":material/smart_toy:"}.get(role, ":material/settings:")
        with st.chat_message(role if role in ("user", "assistant") else "system", avatar=avatar):
            _render_text(turn["content"])


@st.dialog("Guidelines", width="large")
def _guidelines(text: str) -> None:
    _render_guidelines(text or "_This project has no guidelines yet._")


@st.fragment(run_every=1)
def _clock() -> None:
    elapsed = int(time.monotonic() - state.get("ann_started", time.monotonic()))
    st.metric("Time on this item", f"{elapsed // 60}:{elapsed % 60:02d}")


def _progress(project, done: bool) -> None:
    figures = assign.progress(engine, project.id, user.id, fresh=done)
    cols = st.columns(4)
    cols[0].metric("My annotations today", figures["today"])
    cols[1].metric("My annotations in total", figures["total"])
    cols[2].metric("Project completion", f"{figures['project_completion']:.0%}")
    with cols[3]:
        if state.get("ann_task") is not None:
            _clock()


# ----------------------------------------------------------------------------- page

st.title("Annotate")
user_caption(user)

project = project_picker(list_projects(engine), "ann_project_id",
                         "There are no projects yet. A researcher creates them on the Projects page.")

task = state.get("ann_task")
if task is not None and state.get("ann_task_project") != project.id:
    _drop_task()
    task = None
if task is None:
    task = assign.next_item(engine, project.id, user.id)
    if task is not None:
        state["ann_task"] = task
        state["ann_task_project"] = project.id
        state["ann_started"] = time.monotonic()
        _reset_item_state()
        restore = state.pop("ann_restore", None)
        if restore is not None and restore.item_id == task.item_id:
            if task.is_ranking:
                if restore.ranking is not None:
                    state["ann_rank_keys"] = _keys_from_ranks(restore.ranking, task.shown_order)
            elif restore.choice is not None:
                state["ann_answer"] = PairAnswer(
                    choice=next(s for s in CHOICE_KEYS if _to_ab(s, task.shown_swapped) == restore.choice),
                    strength=restore.strength)

# Every element keeps its place from run to run (a message or the choice line fills a slot that is
# always there): an element inserted above the buttons would make the browser redraw them, and a
# key pressed meanwhile would be dropped.
flash_slot = st.empty()
flash = state.pop("ann_flash", None)
if flash:
    getattr(flash_slot, flash[0])(flash[1])

_progress(project, done=task is None)

if task is None:
    st.success("No items left for you in this project. Thank you!")
    st.button("Undo last submission", key="ann_undo", shortcut="Z", on_click=_undo, args=(project.id,))
    st.stop()

top = st.columns([3, 1])
if task.is_ranking:
    top[0].caption(
        f"Keys: **1–{len(task.responses)}** the responses from best to worst · **{TIE_KEY}** then a number: tie with the"
        f" previous · **{BACK_KEY}** take back the last key · **Enter** submit · **S** skip · **B** broken · **U** unsafe"
        " · **Z** undo the last submission · **G** guidelines"
    )
else:
    top[0].caption(
        "Keys: **1** Response 1 better · **2** Response 2 better"
        + (" · **3** tie" if "tie" in project.choices else "")
        + (" · **4** both bad" if "both_bad" in project.choices else "")
        + " · **Q/W/E** slight/clear/strong · **Enter** submit · **S** skip · **B** broken · **U** unsafe"
        + " · **Z** undo · **G** guidelines"
    )
if top[1].button("Guidelines", key="ann_guidelines", shortcut="G", icon=":material/menu_book:"):
    _guidelines(project.guidelines)

st.subheader("Prompt")
_render_prompt(task.prompt)


def _suggestion_text(task) -> str | None:
    """The model's suggestion in the terms the annotator sees (Response 1/2/..), or None."""
    if task.suggestion is None:
        return None
    if task.is_ranking:
        stored = int(task.suggestion)
        if task.shown_order is None or stored not in task.shown_order:
            return None
        return f"The reward model ranks Response {task.shown_order.index(stored) + 1} first."
    shown = 2 if (task.suggestion == "a") == task.shown_swapped else 1
    sure = f" ({task.suggestion_confidence:.0%} sure)" if task.suggestion_confidence is not None else ""
    return f"The reward model prefers Response {shown}{sure}."


_hint = _suggestion_text(task)
if _hint:
    st.info(_hint + " It is often wrong: judge for yourself.", icon=":material/smart_toy:")


def _render_ranking(task) -> None:
    groups, tie_next = _rank_groups(state.get("ann_rank_keys") or [])
    place_of = {p: PLACES[sum(len(g) for g in groups[:i])] for i, group in enumerate(groups) for p in group}
    n = len(task.responses)
    for row_start in range(0, n, 2):
        cols = st.columns(2, gap="medium")
        for col, position in zip(cols, range(row_start, min(row_start + 2, n))):
            with col, st.container(border=True, key=f"ann_resp_{position + 1}"):
                place = place_of.get(position)
                st.markdown(f"**Response {position + 1}**" + (f" · placed {place}" if place else ""))
                _render_text(task.responses[position])
    st.markdown("**Rank the responses: press their numbers from best to worst**")
    key_cols = st.columns(n + 2)
    for position in range(n):
        key_cols[position].button(
            f"Response {position + 1}", key=f"ann_rank_{position + 1}", shortcut=str(position + 1), on_click=_rank_place,
            args=(position,), width="stretch", type="primary" if position in place_of else "secondary",
        )
    key_cols[n].button("Tie with previous", key="ann_rank_tie", shortcut=TIE_KEY, on_click=_rank_tie, width="stretch")
    key_cols[n + 1].button("Take back", key="ann_rank_back", shortcut=BACK_KEY, on_click=_rank_back, width="stretch")
    st.text_area("Rationale (optional; also sent as the note when you flag an item)",
                 key=f"ann_rationale_{task.item_id}", height=80)
    missing = [str(p + 1) for p in range(n) if p not in place_of]
    ranking_line = st.empty()  # always there, so the buttons below keep their place (see the flash slot)
    if groups:
        ranking_line.markdown(f"Your ranking: **{_ranking_text(groups, tie_next)}**"
                    + (f" · still to place: {', '.join(missing)}" if missing else " · complete: Enter submits"))


def _render_actions() -> None:
    actions = st.columns(5)
    actions[0].button("Submit", key="ann_submit", shortcut="Enter", type="primary", on_click=_submit, args=(project,), width="stretch")
    actions[1].button("Skip", key="ann_skip", shortcut="S", on_click=_skip, width="stretch")
    actions[2].button("Flag broken", key="ann_flag_broken", shortcut="B", on_click=_flag, args=("broken",), width="stretch")
    actions[3].button("Flag unsafe", key="ann_flag_unsafe", shortcut="U", on_click=_flag, args=("unsafe",), width="stretch")
    actions[4].button("Undo last", key="ann_undo", shortcut="Z", on_click=_undo, args=(project.id,), width="stretch")


if task.is_ranking:
    _render_ranking(task)
    _render_actions()
    st.stop()

left, right = st.columns(2, gap="medium")
with left:
    with st.container(border=True, key="ann_left"):
        st.markdown("**Response 1**")
        _render_text(task.left_text)
with right:
    with st.container(border=True, key="ann_right"):
        st.markdown("**Response 2**")
        _render_text(task.right_text)

answer = state["ann_answer"]
st.markdown("**Which response is better?**")
choice_cols = st.columns(4)
shown_choices = ["left", "right"] + [c for c in ("tie", "both_bad") if c in project.choices]
for col, shown in zip(choice_cols, shown_choices):
    key, label, _, _ = CHOICE_KEYS[shown]
    col.button(
        label, key=f"ann_choice_{shown}", shortcut=key, on_click=_choose, args=(answer, shown), width="stretch",
        type="primary" if answer.choice == shown else "secondary",
    )

st.markdown("**How much better?** (for Response 1 or 2)")
strength_cols = st.columns(4)
for col, (level, (key, label)) in zip(strength_cols, STRENGTH_KEYS.items()):
    col.button(
        label, key=f"ann_strength_{level}", shortcut=key, on_click=_set_strength, args=(answer, level), width="stretch",
        type="primary" if answer.strength == level else "secondary",
        # Never disabled: a disabled button drops a shortcut typed before the rerun that enables it.
    )

if project.criteria:
    with st.expander("Per criterion (optional)", expanded=False):
        for name in project.criteria:
            st.radio(name, _criterion_options(project), index=None, horizontal=True, key=f"ann_crit_{task.item_id}_{name}")

st.text_area("Rationale (optional; also sent as the note when you flag an item)",
             key=f"ann_rationale_{task.item_id}", height=80)

choice_line = st.empty()
if answer.choice:
    choice_line.markdown(f"Your choice: **{CHOICE_KEYS[answer.choice][1]}**"
                         + (f", {STRENGTH_KEYS[answer.strength][1].lower()}" if answer.strength else ""))

_render_actions()
if answer.choice and answer.drawn_at is None:  # this run reached the end: the browser draws the choice now
    answer.drawn_at = time.monotonic()
