"""`rlhf serve-rm`: serve a trained reward model over HTTP (OpenRLHF's /get_reward, /score, /health).

    rlhf serve-rm --model runs/rm-1 [--host 127.0.0.1] [--port 5000] [--batch-size 32]
        [--max-request-pairs 16384] [--max-body-bytes 67108864] [--json]
    # OpenRLHF: --remote_rm_url http://127.0.0.1:5000/get_reward

--model is a run directory, an ensemble directory, or a registered model id or name (looked up as
`rlhf eval-rm` does). The server runs until Ctrl-C or SIGTERM; with --json it prints one JSON
object (url, model, base) once it is listening, which is how scripts learn the port of --port 0.
"""

from __future__ import annotations

from pathlib import Path

import typer

from app.cli import JsonOpt, cli, emit, engine
from reward.serve import LOOPBACK, ServeSpec

DEFAULTS = ServeSpec()


def resolve_model(model: str) -> str:
    """A model directory as given, or the path of the registered model with that id or name."""
    if Path(model).is_dir():
        return model
    from annotation.store import transaction
    from annotation.registry import get_model

    with transaction(engine()) as session:
        return get_model(session, model).path


@cli.command("serve-rm")
def serve_rm(
    model: str = typer.Option(..., "--model", help="Run directory, ensemble directory, or registered model id/name."),
    host: str = typer.Option(DEFAULTS.host, "--host", help=ServeSpec.help("host")),
    port: int = typer.Option(DEFAULTS.port, "--port", help=ServeSpec.help("port")),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help=ServeSpec.help("batch_size")),
    max_request_pairs: int = typer.Option(DEFAULTS.max_request_pairs, "--max-request-pairs",
                                          help=ServeSpec.help("max_request_pairs")),
    max_body_bytes: int = typer.Option(DEFAULTS.max_body_bytes, "--max-body-bytes", help=ServeSpec.help("max_body_bytes")),
    log_level: str = typer.Option(DEFAULTS.log_level, "--log-level", help=ServeSpec.help("log_level")),
    as_json: bool = JsonOpt,
) -> None:
    """Serve a reward model over HTTP: POST /get_reward (OpenRLHF's remote RM), POST /score, GET /health."""
    from reward.score import load_reward_model
    from reward.serve import RewardServer, model_info

    spec = ServeSpec(host=host, port=port, batch_size=batch_size, max_request_pairs=max_request_pairs,
                     max_body_bytes=max_body_bytes, log_level=log_level).validate()
    scorer = load_reward_model(resolve_model(model))
    if host not in LOOPBACK:
        typer.echo(f"warning: listening on {host}, beyond this machine; the server has no authentication", err=True)

    def ready(server: RewardServer) -> None:
        info = model_info(scorer)
        payload = {"url": server.url, "get_reward": f"{server.url}/get_reward", **info}
        kind = f"ensemble of {info['members']}" if info["ensemble"] else "reward model"
        emit(payload, as_json, f"serving {kind} {info['model']} (base {info['base']}) on {server.url}\n"
                               f"OpenRLHF: --remote_rm_url {server.url}/get_reward   (Ctrl-C stops)")

    RewardServer(scorer, spec).run(on_ready=ready)
