"""`rlhf leaderboard`: rank the sources (models) behind a project's responses from its annotations.

    rlhf leaderboard --project demo
    rlhf leaderboard --project demo --json --bootstrap 2000 --seed 1
    rlhf leaderboard --project demo --ties ignore --both-bad tie --min-battles 50 --anchor gpt-4

Bradley-Terry ratings on the Elo scale (Chatbot Arena's method) with 95% bootstrap intervals over
annotations, win/loss/tie counts and notes on what the data cannot tell. Everything comes from
annotation.leaderboard; this module only prints it.
"""

from __future__ import annotations

from typing import Optional

import typer

from app.cli import JsonOpt, cli, emit, engine


def render_text(report: dict) -> str:
    """The report for people: one line of what was fitted, the table best first, then the notes."""
    method, boot = report["method"], report["bootstrap"]
    lines = [
        f"project '{report['project']}': {report['n_battles']} battles among {report['n_sources']} sources "
        f"(ties: {method['ties']}, both_bad: {method['both_bad']}; rating {method['centre']})"
    ]
    width = max([len("source")] + [len(r["source"]) for r in report["ratings"]])
    ci_head = f"{boot['confidence']:.0%} interval" if boot["resamples"] else ""
    lines.append(f"{'rank':>4}  {'source':<{width}}  {'rating':>7}  {ci_head:<18}  {'battles':>7}  {'wins':>6}  {'losses':>6}  {'ties':>6}")
    for rank, r in enumerate(report["ratings"], 1):
        ci = f"[{r['low']:.1f}, {r['high']:.1f}]" if r["low"] is not None else ""
        lines.append(
            f"{rank:>4}  {r['source']:<{width}}  {r['rating']:>7.1f}  {ci:<18}  {r['battles']:>7}  "
            f"{r['wins']:>6}  {r['losses']:>6}  {r['ties']:>6}"
        )
    if boot["resamples"]:
        lines.append(f"intervals: percentile bootstrap, {boot['resamples']} resamples of annotations, seed {boot['seed']}")
    for key, note in report["notes"].items():
        lines.append(f"note: {key}: {note}")
    return "\n".join(lines)


@cli.command()
def leaderboard(
    project: str = typer.Option(..., "--project", help="Project whose annotations rank the sources of its responses."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples of annotations for the 95% intervals; 0 for none."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the bootstrap."),
    ties: str = typer.Option("half", "--ties", help="half: a tie is half a win for each side (Chatbot Arena); ignore: leave ties out."),
    both_bad: str = typer.Option("ignore", "--both-bad", help="ignore: leave both_bad out; tie: count it as a tie."),
    min_battles: int = typer.Option(0, "--min-battles", help="Leave out sources with fewer battles than this, and their battles."),
    anchor: Optional[str] = typer.Option(None, "--anchor", help="Source rated 1000 (default: the mean rating is 1000)."),
    as_json: bool = JsonOpt,
) -> None:
    """Leaderboard of response sources: Bradley-Terry ratings (Elo scale) with bootstrap intervals."""
    from annotation.leaderboard import project_leaderboard

    report = project_leaderboard(
        engine(), project, bootstrap=bootstrap, seed=seed, ties=ties, both_bad=both_bad, min_battles=min_battles, anchor=anchor
    )
    emit(report, as_json, render_text(report))
