"""`rlhf serve-rm` (reward/serve.py): OpenRLHF's /get_reward, /score and /health over real HTTP.

    .venv/bin/python -m pytest -q tests/test_serve_rm.py

The reward models are tiny BERTs with an untrained score head, saved the way reward.train saves a
run (model, tokenizer, reward_config.json), so every score is a real forward pass without training.
Each server runs in a thread on a free loopback port and is called with urllib / http.client in the
exact request shape OpenRLHF's remote RM client sends.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reward_fixtures import save_reward_models, synthetic_pairs  # noqa: E402

from reward.errors import RewardError  # noqa: E402
from reward.score import load_reward_model  # noqa: E402
from reward.serve import RewardServer, ServeSpec, split_queries  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUIET = dict(host="127.0.0.1", port=0, log_level="warning")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_reward_models(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def scorer(models):
    return load_reward_model(models["single"])


@pytest.fixture(scope="module")
def server(scorer):
    with RewardServer(scorer, ServeSpec(batch_size=4, **QUIET)) as srv:
        yield srv


def post(url: str, payload, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def openrlhf_request(pairs):
    """What OpenRLHF's remote_rm_fn posts: query = prompt + response, the prompts, and the labels."""
    return {"query": [p.prompt + " " + p.chosen for p in pairs], "prompts": [p.prompt for p in pairs],
            "labels": ["" for _ in pairs]}


def test_get_reward_in_openrlhfs_shape_equals_in_process_scores(server, scorer):
    pairs = synthetic_pairs(11, seed=3)
    status, body = post(f"{server.url}/get_reward", openrlhf_request(pairs))
    assert status == 200, body
    expected = scorer.score([p.prompt for p in pairs], [" " + p.chosen for p in pairs]).tolist()
    assert body["rewards"] == pytest.approx(expected, abs=1e-5)
    assert body["scores"] == body["rewards"]  # OpenRLHF reads `scores` for dynamic filtering
    assert body["extra_logs"] == {}


def test_a_query_without_its_prompt_is_scored_whole_with_an_empty_prompt(server, scorer):
    queries = ["w1 w2 good w3", "w4 w5 bad", "w6 good"]
    status, body = post(f"{server.url}/get_reward", {"query": queries, "prompts": ["w1 w2", "not the start", ""],
                                                      "labels": None})
    assert status == 200, body
    expected = scorer.score(["w1 w2", "", ""], [" good w3", "w4 w5 bad", "w6 good"]).tolist()
    assert body["rewards"] == pytest.approx(expected, abs=1e-5)
    # Without prompts at all (OpenRLHF's older client sends only `query`), every query is a response.
    status, body = post(f"{server.url}/get_reward", {"query": queries})
    assert status == 200, body
    assert body["rewards"] == pytest.approx(scorer.score(["", "", ""], queries).tolist(), abs=1e-5)
    status, body = post(f"{server.url}/get_reward", {"query": []})
    assert (status, body["rewards"]) == (200, [])


def test_split_queries():
    assert split_queries(["ab", "cd", "e"], ["a", "x", ""]) == (["a", "", ""], ["b", "cd", "e"])
    assert split_queries(["ab"], None) == ([""], ["ab"])


def test_concurrent_single_query_requests_share_batches_and_get_their_own_scores(server, scorer):
    # OpenRLHF's vLLM executor posts one query per sample, many at once.
    pairs = synthetic_pairs(24, seed=5)
    expected = scorer.score([p.prompt for p in pairs], [" " + p.chosen for p in pairs]).tolist()
    got: dict[int, float] = {}

    def one(i):
        status, body = post(f"{server.url}/get_reward", openrlhf_request([pairs[i]]))
        assert status == 200, body
        got[i] = body["rewards"][0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(pairs))] == pytest.approx(expected, abs=1e-5)


def test_score_endpoint_and_health(server, scorer, models):
    pairs = synthetic_pairs(5, seed=7)
    msgs = [{"role": "user", "content": "w1 w2"}]
    payload = {"pairs": [{"prompt": p.prompt, "response": p.rejected} for p in pairs] + [{"prompt": msgs, "response": "good"}]}
    status, body = post(f"{server.url}/score", payload)
    assert status == 200, body
    expected = scorer.score([p.prompt for p in pairs] + [msgs], [p.rejected for p in pairs] + ["good"]).tolist()
    assert body["rewards"] == pytest.approx(expected, abs=1e-5)
    assert "spread" not in body
    status, health = get(f"{server.url}/health")
    assert status == 200
    assert health["ready"] is True and health["ensemble"] is False
    assert health["model"] == str(models["single"]) and health["base"] == str(models["base"])
    assert health["batch_size"] == 4


def test_an_ensemble_answers_its_spread(models):
    scorer = load_reward_model(models["ensemble"])
    pairs = synthetic_pairs(6, seed=9)
    mean, std = scorer.score_with_spread([p.prompt for p in pairs], [" " + p.chosen for p in pairs])
    assert float(std.max()) > 0  # two members with different heads disagree
    with RewardServer(scorer, ServeSpec(**QUIET)) as srv:
        status, body = post(f"{srv.url}/get_reward", openrlhf_request(pairs))
        assert status == 200, body
        assert body["rewards"] == pytest.approx(mean.tolist(), abs=1e-5)
        assert body["extra_logs"]["reward_spread"] == pytest.approx(std.tolist(), abs=1e-5)
        status, body = post(f"{srv.url}/score", {"pairs": [{"prompt": p.prompt, "response": " " + p.chosen} for p in pairs]})
        assert body["rewards"] == pytest.approx(mean.tolist(), abs=1e-5)
        assert body["spread"] == pytest.approx(std.tolist(), abs=1e-5)
        status, health = get(f"{srv.url}/health")
        assert health["ensemble"] is True and health["members"] == 2 and health["base"] == str(models["base"])


BAD_REQUESTS = [
    ("get_reward", b"{not json", 400, "not valid JSON"),
    ("get_reward", b"", 400, "empty request body"),
    ("get_reward", b"{\"query\": [\"\xff\"]}", 400, "UTF-8"),
    ("get_reward", b"[1, 2]", 400, "is an array; expected a JSON object"),
    ("get_reward", {"prompts": ["a"]}, 400, "missing field 'query'"),
    ("get_reward", {"queries": ["a"]}, 400, "got 'queries'"),
    ("get_reward", {"query": "one text"}, 400, "'query' is a string; expected a list"),
    ("get_reward", {"query": ["a", 3]}, 400, "'query[1]' is a number"),
    ("get_reward", {"query": ["a", "b"], "prompts": ["a"]}, 400, "'prompts' has 1 entries but 'query' has 2"),
    ("get_reward", {"query": ["a"], "prompts": [None]}, 400, "'prompts[0]' is null"),
    ("get_reward", {"query": ["a"], "labels": ["x", "y"]}, 400, "'labels' has 2 entries"),
    ("get_reward", {"query": ["a"], "labels": "x"}, 400, "'labels' is a string"),
    ("score", {"query": ["a"]}, 400, "missing field 'pairs'"),
    ("score", {"pairs": {"prompt": "a"}}, 400, "'pairs' is an object"),
    ("score", {"pairs": ["a"]}, 400, "pairs[0] is a string"),
    ("score", {"pairs": [{"prompt": "a", "response": "b"}, {"prompt": "a"}]}, 400, "pairs[1]: missing 'response'"),
    ("score", {"pairs": [{"prompt": "a", "response": 1}]}, 400, "pairs[0].response is a number"),
    ("score", {"pairs": [{"prompt": [{"role": "user"}], "response": "b"}]}, 400, "pairs[0].prompt[0] is not"),
    ("score", {"pairs": [{"prompt": 5, "response": "b"}]}, 400, "pairs[0].prompt is a number"),
]


@pytest.mark.parametrize("endpoint,payload,status,message", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_that_says_what_is_wrong(server, endpoint, payload, status, message):
    raw = payload if isinstance(payload, bytes) else None
    got, body = post(f"{server.url}/{endpoint}", payload, raw=raw)
    assert got == status, body
    assert message in body["error"], body
    assert "Traceback" not in body["error"]


def test_unknown_paths_and_methods_answer_json(server):
    status, body = get(f"{server.url}/nope")
    assert status == 404 and "/get_reward" in body["error"]
    status, body = get(f"{server.url}/get_reward")
    assert status == 405 and "POST" in body["error"]


def test_oversize_bodies_and_too_many_pairs_are_refused(scorer):
    with RewardServer(scorer, ServeSpec(max_body_bytes=2000, max_request_pairs=4, **QUIET)) as srv:
        big = json.dumps({"query": ["w1 " * 1000]}).encode()
        status, body = post(f"{srv.url}/get_reward", None, raw=big)
        assert status == 413 and "--max-body-bytes" in body["error"], body
        # A chunked body has no Content-Length: it is counted as it arrives.
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        chunks = (big[i:i + 500] for i in range(0, len(big), 500))
        conn.request("POST", "/get_reward", body=chunks, headers={"Content-Type": "application/json"}, encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413 and "--max-body-bytes" in json.loads(resp.read())["error"]
        conn.close()
        status, body = post(f"{srv.url}/get_reward", {"query": ["w1"] * 5})
        assert status == 413 and "at most 4" in body["error"] and "--max-request-pairs" in body["error"], body
        status, body = post(f"{srv.url}/score", {"pairs": [{"prompt": "a", "response": "b"}] * 5})
        assert status == 413 and "at most 4" in body["error"], body
        assert post(f"{srv.url}/get_reward", {"query": ["w1"] * 4})[0] == 200  # the server still serves


class BrokenScorer:
    path = "/secret/run"

    def score_with_spread(self, prompts, responses, batch_size=32):
        raise RuntimeError("CUDA out of memory at /secret/path/model.py line 12")


def test_a_failure_inside_the_server_is_a_500_without_traceback_or_details():
    with RewardServer(BrokenScorer(), ServeSpec(host="127.0.0.1", port=0, log_level="critical")) as srv:
        status, body = post(f"{srv.url}/get_reward", {"query": ["a"]})
        assert status == 500
        assert body == {"error": "internal error (RuntimeError); the server log has the details"}
        assert get(f"{srv.url}/health")[0] == 200  # and keeps serving


def test_the_server_shuts_down_cleanly_and_frees_its_port(scorer):
    srv = RewardServer(scorer, ServeSpec(**QUIET)).start()
    port, thread = srv.port, srv._thread
    assert get(f"{srv.url}/health")[0] == 200
    srv.stop()
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with socket.socket() as s:  # nothing left holding it
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("field,value,message", [("port", 70000, "--port 70000"), ("batch_size", 0, "--batch-size 0"),
                                                 ("max_body_bytes", -1, "--max-body-bytes -1"), ("host", "", "--host")])
def test_bad_settings_are_clear_errors(field, value, message):
    with pytest.raises(RewardError, match=message):
        ServeSpec(**{field: value}).validate()


def test_a_busy_port_is_a_clear_error(scorer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(RewardError, match="did not start"):
            RewardServer(scorer, ServeSpec(host="127.0.0.1", port=s.getsockname()[1], log_level="critical")).start()


def test_cli_serves_a_registered_model_by_name_until_terminated(models, settings):
    from annotation.store import init_db, transaction
    from annotation.registry import register_model

    eng = init_db(settings.db_url)
    with transaction(eng) as session:
        register_model(session, kind="reward", name="rm-serve", path=str(models["single"]), base_model="tiny-bert")
    eng.dispose()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve-rm", "--model", "rm-serve", "--port", "0",
                             "--json", "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server listens
        assert line, proc.stderr.read()
        ready = json.loads(line)
        assert ready["model"] == str(models["single"]) and ready["get_reward"] == ready["url"] + "/get_reward"
        assert get(f"{ready['url']}/health")[1]["ready"] is True
        status, body = post(ready["get_reward"], openrlhf_request(synthetic_pairs(3)))
        assert status == 200 and len(body["rewards"]) == 3
    finally:
        proc.terminate()
        rc = proc.wait(30)
    assert rc == 0, proc.stderr.read()  # SIGTERM is a graceful stop, not a kill
