"""The judge client and win-rate evaluation over real HTTP on loopback: faults against a scriptable
judge (retries, malformed replies, the endpoint down at start or mid-run, key secrecy), and
end to end with ``sami-serve`` serving a tiny model as the judge."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from judge_server import FakeJudge

from megatron_sami.evaluation.judge import JudgeClient, JudgeConfig, JudgeError
from megatron_sami.evaluation.pairwise import evaluate_pair
from megatron_sami.evaluation.winrate import JUDGE_PROMPT, JUDGE_SYSTEM, Comparison, judge_messages
from megatron_sami.rollout.constitutions import load_constitution_set

ROOT = Path(__file__).resolve().parents[1]
PRINCIPLES = ["helpful", "harmless"]


def rows(kind: str) -> list[dict]:
    """Eight queries: the test response holds GOOD in 0-5, the baseline's in 6, neither in 7."""
    out = []
    for index in range(8):
        good = (index < 6) if kind == "test" else (index == 6)
        text = f"{kind} answer {index}" + (" GOOD" if good else "")
        out.append({"id": f"q{index}", "query": f"question {index}", "split": "train", "principles": PRINCIPLES,
                    "response": text})
    return out


EXPECTED = (6 * 1.0 + 0.0 + 0.5) / 8  # per principle: six wins, one loss, one undecided


def judge_config(url: str, **overrides) -> JudgeConfig:
    settings = dict(base_url=url, model="judge", api_key_env=None, concurrency=2, timeout_s=5, max_retries=3,
                    backoff_s=0.01)
    return JudgeConfig(**(settings | overrides))


def evaluate(judge: JudgeConfig, out: Path) -> dict:
    return evaluate_pair(rows("test"), rows("baseline"), load_constitution_set("dialogue"), judge, out, seed=5,
                         cache_dir=out / "cache")


def test_rates_from_parsed_verdicts_with_429_and_500_retried(tmp_path):
    with FakeJudge(faults=["429", "500", "429", "503"]) as judge:
        result = evaluate(judge_config(judge.url), tmp_path / "eval")
    assert judge.seen == 16 + 4
    learned = result["splits"]["learned"]
    assert learned["win_rate"]["n"] == 16 and learned["undecided"] == 2 and learned["malformed"] == 0
    for name in PRINCIPLES:
        assert learned["principles"][name]["win_rate"]["mean"] == pytest.approx(EXPECTED)
    judged = [json.loads(line) for line in (tmp_path / "eval" / "judgements.jsonl").read_text().splitlines()]
    assert {row["test_first"] for row in judged} == {True, False}  # both placements occurred
    for row in judged:
        winner_letter = "A" if row["test_first"] == ("GOOD" in row["test"]) else "B"
        if "GOOD" in row["test"] or "GOOD" in row["baseline"]:
            assert row["verdict"] == winner_letter


def test_retry_after_is_honoured(tmp_path):
    with FakeJudge(faults=["429:1"]) as judge:
        started = time.monotonic()
        result = evaluate(judge_config(judge.url, concurrency=1), tmp_path / "eval")
        assert judge.answered and result["all"]["win_rate"]["n"] == 16
    assert time.monotonic() - started >= 1.0  # the backoff alone would wait 0.01 s


def test_malformed_reply_is_counted_not_cached_and_asked_again(tmp_path):
    with FakeJudge(faults=["malformed"]) as judge:
        first = evaluate(judge_config(judge.url, concurrency=1), tmp_path / "eval")
        assert first["all"]["malformed"] == 1 and first["all"]["win_rate"]["n"] == 16
        asked_before = judge.seen
        second = evaluate(judge_config(judge.url, concurrency=1), tmp_path / "eval")
        assert judge.seen == asked_before + 1  # only the malformed one is asked again
    assert second["all"]["malformed"] == 0
    assert second["all"]["win_rate"]["mean"] == pytest.approx(EXPECTED)


def test_judge_going_down_mid_run_resumes_from_the_cache_judging_nothing_twice(tmp_path):
    first = FakeJudge(down_after=5)
    with pytest.raises(JudgeError, match="rerun the same command to resume"):
        evaluate(judge_config(first.url, concurrency=1, timeout_s=2, max_retries=1), tmp_path / "eval")
    first.stop()
    assert len(first.answered) == 5
    assert not (tmp_path / "eval" / "result.json").exists()
    with FakeJudge(port=first.port) as second:
        result = evaluate(judge_config(second.url, concurrency=1), tmp_path / "eval")
    assert len(second.answered) == 16 - 5
    assert not set(first.answered) & set(second.answered)
    assert result["all"]["win_rate"]["mean"] == pytest.approx(EXPECTED)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_rows(tmp_path: Path) -> tuple[Path, Path]:
    paths = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for kind in ("test", "baseline"):
        path = tmp_path / f"{kind}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows(kind)))
        paths.append(path)
    return paths[0], paths[1]


def sami_eval_winrate(tmp_path: Path, url: str, key_env: str, env: dict) -> subprocess.CompletedProcess:
    test, baseline = write_rows(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "megatron_sami.cli.eval", "winrate", "--test-records", str(test), "--baseline-records",
         str(baseline), "--out", str(tmp_path / "out"), "--judge-url", url, "--judge-model", "judge",
         "--judge-api-key-env", key_env, "--judge-retries", "1", "--judge-backoff", "0.01", "--judge-timeout", "5"],
        capture_output=True, text=True, timeout=300, env=os.environ | env)


def test_unreachable_judge_is_one_clear_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = sami_eval_winrate(tmp_path, url, "SAMI_TEST_NO_KEY", {})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot reach the judge at {url}" in result.stderr and "sami-serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_api_key_is_sent_but_never_logged_written_or_echoed(tmp_path):
    secret, wrong = "sk-test-SECRET-4242", "sk-wrong-KEY-9999"
    with FakeJudge(api_key=secret) as judge:
        good = sami_eval_winrate(tmp_path / "good", judge.url, "SAMI_TEST_JUDGE_KEY", {"SAMI_TEST_JUDGE_KEY": secret})
        assert good.returncode == 0, good.stderr[-2000:]
        assert len(judge.answered) == 16
        bad = sami_eval_winrate(tmp_path / "bad", judge.url, "SAMI_TEST_JUDGE_KEY", {"SAMI_TEST_JUDGE_KEY": wrong})
    assert bad.returncode == 2 and "refused the API key" in bad.stderr and "SAMI_TEST_JUDGE_KEY" in bad.stderr
    assert "learned" in good.stdout and "plot:" in good.stdout
    for result in (good, bad):
        for key in (secret, wrong):
            assert key not in result.stdout + result.stderr
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "result.json" for path in written) and any("cache" in str(path) for path in written)
    for path in written:
        content = path.read_bytes()
        assert secret.encode() not in content and wrong.encode() not in content, path


# -- sami-serve as the judge ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny random Llamas sharing a tokenizer trained on the prompts' own words."""
    from megatron_sami.models.catalogue import config_dir
    from megatron_sami.testing.tiny import make_tiny_hf_model, make_tiny_tokenizer

    root = tmp_path_factory.mktemp("judge-models")
    queries = [f"How do I fix problem number {i} at home?" for i in range(6)]
    principles = [text for p in load_constitution_set("dialogue").principles for text in (p.definition, p.antithesis)]
    corpus = (queries + principles + [(config_dir() / "template" / "dialogue.yaml").read_text(), JUDGE_PROMPT,
                                      JUDGE_SYSTEM]) * 8
    tokenizer = make_tiny_tokenizer(root / "a", vocab_size=700, corpus=corpus)
    make_tiny_hf_model("llama", root / "a", vocab_size=len(tokenizer), max_position_embeddings=2048)
    shutil.copytree(root / "a", root / "b")
    make_tiny_hf_model("llama", root / "b", seed=1, vocab_size=len(tokenizer), max_position_embeddings=2048)
    with (root / "queries.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"id": f"q{i}", "query": q}) + "\n" for i, q in enumerate(queries))
    return root


@pytest.fixture(scope="module")
def served(models):
    env = os.environ | {"SAMI_TEST_SERVE_KEY": "sk-serve-777"}
    process = subprocess.Popen([sys.executable, "-m", "megatron_sami.cli.serve", str(models / "a"), "--port", "0",
                                "--api-key-env", "SAMI_TEST_SERVE_KEY", "--served-model-name", "tiny-judge",
                                "--max-tokens", "64", "--max-body-bytes", "20000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    assert "serving 'tiny-judge' at http://" in line, process.stderr.read()
    yield {"url": line.strip().split(" at ")[1], "key": "sk-serve-777", "process": process}
    process.terminate()
    process.wait(timeout=30)


def post(served, path: str, payload, key: str | None = "default") -> tuple[int, dict]:
    key = served["key"] if key == "default" else key
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(served["url"] + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_served_chat_completion_equals_direct_greedy_generation(served, models):
    from megatron_sami.rollout.generation import GenerationConfig, HFBackend

    messages = [{"role": "system", "content": "Be helpful."},
                {"role": "user", "content": "How do I fix problem number 2 at home?"}]
    status, reply = post(served, "/chat/completions", {"model": "tiny-judge", "messages": messages,
                                                       "max_tokens": 12, "temperature": 0})
    assert status == 200 and reply["object"] == "chat.completion"
    direct = HFBackend(models / "a", GenerationConfig(max_new_tokens=12, temperature=0.0, stop=[], batch_size=1))
    # The tiny tokenizer has no chat template: the server writes a plain transcript.
    expected = direct.generate(["System: Be helpful.\n\nUser: How do I fix problem number 2 at home?\n\nAssistant:"])[0]
    assert reply["choices"][0]["message"]["content"] == expected.text
    assert reply["usage"]["completion_tokens"] == expected.num_tokens
    assert reply["choices"][0]["finish_reason"] == ("stop" if expected.finished else "length")
    status, completion = post(served, "/completions", {"prompt": "Human: hello\n\nAssistant:", "max_tokens": 4,
                                                       "temperature": 0})
    assert status == 200 and isinstance(completion["choices"][0]["text"], str)


@pytest.mark.parametrize(("payload", "key", "status", "message"), [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, "default", 400, "exceeds this server's limit"),
    ({"messages": [{"role": "user", "content": "hi"}]}, None, 401, "API key"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "sk-wrong", 401, "API key"),
    ({"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}]}, "default", 404, "serves 'tiny-judge'"),
    ({"messages": []}, "default", 400, "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, "default", 400, "one choice"),
    (b"{not json", "default", 400, "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 30000}]}).encode(), "default", 413, "exceeds the limit"),
])
def test_served_limits_and_errors_are_clear_4xx(served, payload, key, status, message):
    got, body = post(served, "/chat/completions", payload, key=key)
    assert got == status and message in body["error"]["message"]
    assert served["process"].poll() is None


def test_winrate_of_two_checkpoints_judged_by_sami_serve(served, models, tmp_path):
    out = tmp_path / "winrate"
    result = subprocess.run(
        [sys.executable, "-m", "megatron_sami.cli.eval", "winrate", "--test", str(models / "b"), "--baseline-model",
         str(models / "a"), "--out", str(out), "--queries", str(models / "queries.jsonl"), "--num-queries", "3",
         "--max-new-tokens", "8", "--judge-url", served["url"], "--judge-model", "tiny-judge",
         "--judge-api-key-env", "SAMI_TEST_SERVE_KEY", "--judge-max-tokens", "16"],
        capture_output=True, text=True, timeout=900, env=os.environ | {"SAMI_TEST_SERVE_KEY": served["key"]})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "result.json").read_text())
    judged = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == summary["all"]["win_rate"]["n"] == 3 * 2  # queries x the dialogue set's principles
    from megatron_sami.evaluation.winrate import parse_verdict, win_score

    for row in judged:
        assert isinstance(row["judge_reply"], str) and row["status"] == "ok"
        assert row["verdict"] == parse_verdict(row["judge_reply"])
        assert row["score"] == win_score(row["verdict"], row["test_first"])
    assert summary["all"]["undecided"] == sum(row["verdict"] is None for row in judged)
    test_rows = [json.loads(line) for line in (out / "responses" / "test.jsonl").read_text().splitlines()]
    assert {row["id"] for row in test_rows} == {row["query_id"] for row in judged}
    assert (out / "winrate.png").stat().st_size > 0
    assert "win rate" in result.stdout and "learned" in result.stdout


def test_learned_and_heldout_principles_are_reported_separately(tmp_path):
    cset = load_constitution_set("diverse_summarization")
    learned, heldout = [p.name for p in cset.pool("train")[:2]], [p.name for p in cset.pool("heldout")[:2]]
    test_rows, baseline_rows = [], []
    for index in range(4):
        for split, names in (("train", learned), ("heldout", heldout)):
            common = {"id": f"q{index}", "query": f"post {index}", "split": split, "principles": names}
            # the test model wins on learned principles, loses on held-out ones
            test_rows.append(common | {"response": "summary" + (" GOOD" if split == "train" else "")})
            baseline_rows.append(common | {"response": "other" + (" GOOD" if split == "heldout" else "")})
    with FakeJudge() as judge:
        result = evaluate_pair(test_rows, baseline_rows, cset, judge_config(judge.url), tmp_path, seed=1)
    assert set(result["splits"]) == {"learned", "heldout"}
    assert result["splits"]["learned"]["win_rate"]["mean"] == 1.0
    assert result["splits"]["heldout"]["win_rate"]["mean"] == 0.0
    assert set(result["splits"]["heldout"]["principles"]) == set(heldout)
    assert all(block["win_rate"]["n"] == 4 for block in result["splits"]["learned"]["principles"].values())


# -- transport security and faults (httpx) --------------------------------------------------------

SECRET = "sk-test-REDIRECT-5150"


def keyed_client(url: str, monkeypatch, tmp_path: Path, **overrides) -> JudgeClient:
    monkeypatch.setenv("SAMI_TEST_JUDGE_KEY", SECRET)
    return JudgeClient(judge_config(url, api_key_env="SAMI_TEST_JUDGE_KEY", **overrides), tmp_path / "cache")


MESSAGES = judge_messages(Comparison("q0", "question", "learned", "helpful", "Be helpful.", "x GOOD", "y"), seed=0)


@pytest.mark.parametrize("how", ["check_reachable", "complete", "evaluate"])
def test_the_key_never_follows_a_redirect_to_another_origin(how, monkeypatch, tmp_path):
    with FakeJudge() as other, FakeJudge(api_key=SECRET, redirect_to=other.url) as first:
        client = keyed_client(first.url, monkeypatch, tmp_path)
        with pytest.raises(JudgeError, match=f"redirecting to {other.url}/.*set judge.base_url") as raised:
            if how == "check_reachable":
                client.check_reachable()
            elif how == "complete":
                client.complete(MESSAGES)
            else:
                evaluate(client.cfg, tmp_path / "eval")
        assert first.requests and all(auth == f"Bearer {SECRET}" for _, _, auth in first.requests)
        assert other.requests == []  # not followed at all: no key, and no POST turned into a GET verdict
    assert SECRET not in str(raised.value)
    assert not (tmp_path / "eval" / "judgements.jsonl").exists() and not list(tmp_path.rglob("*.json"))


def test_models_redirect_within_the_origin_is_followed(monkeypatch, tmp_path):
    with FakeJudge(api_key=SECRET, models_moved=True) as judge:
        keyed_client(judge.url, monkeypatch, tmp_path).check_reachable()
    assert judge.requests == [("GET", "/v1/models", f"Bearer {SECRET}"), ("GET", "/v1/models/", f"Bearer {SECRET}")]


def test_reply_cut_mid_body_is_retried(tmp_path):
    with FakeJudge(faults=["truncate"]) as judge:
        result = evaluate(judge_config(judge.url, concurrency=1), tmp_path / "eval")
    assert judge.seen == 16 + 1 and result["all"]["malformed"] == 0
    assert result["all"]["win_rate"]["mean"] == pytest.approx(EXPECTED)


def test_timeout_bounds_the_whole_request_not_each_read(tmp_path):
    # The reply arrives one byte every 0.2 s: each read is quick, the whole reply takes ~40 s.
    with FakeJudge(faults=["trickle"]) as judge:
        client = JudgeClient(judge_config(judge.url, timeout_s=1, max_retries=0), tmp_path / "cache")
        with pytest.raises(JudgeError, match="no complete reply within 1 s"):
            client.complete(MESSAGES)
    assert judge.answered == []


@pytest.mark.parametrize(("url", "key", "warned"), [
    ("http://10.1.2.3:8000/v1", SECRET, True),
    ("http://judge.example.org/v1", SECRET, True),
    ("http://10.1.2.3:8000/v1", None, False),  # no key, nothing to leak
    ("https://10.1.2.3:8000/v1", SECRET, False),
    ("http://127.0.0.1:8000/v1", SECRET, False),
    ("http://127.8.9.10:8000/v1", SECRET, False),
    ("http://localhost:8000/v1", SECRET, False),
    ("http://[::1]:8000/v1", SECRET, False),
])
def test_a_key_over_plain_http_beyond_loopback_is_warned_about_once(url, key, warned, monkeypatch, caplog, tmp_path):
    from megatron_sami.evaluation import judge as judge_module

    monkeypatch.setattr(judge_module, "_warned_plain_http", set())
    if key:
        monkeypatch.setenv("SAMI_TEST_JUDGE_KEY", key)
    else:
        monkeypatch.delenv("SAMI_TEST_JUDGE_KEY", raising=False)
    with caplog.at_level("WARNING", logger="megatron_sami.evaluation.judge"):
        for _ in range(2):
            JudgeClient(judge_config(url, api_key_env="SAMI_TEST_JUDGE_KEY"), tmp_path)
    warnings = [record.getMessage() for record in caplog.records if "plain http" in record.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    assert all(SECRET not in message for message in warnings)


def write_fake_models(tmp_path: Path) -> tuple[Path, Path]:
    """Directories that pass the HF-directory check but hold no model: generating would fail."""
    dirs = []
    for name in ("test-model", "baseline-model"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
        dirs.append(tmp_path / name)
    return dirs[0], dirs[1]


@pytest.mark.parametrize(("mode", "judge_fault"), [("models", "down"), ("models", "wrong key"), ("run-dir", "down")])
def test_an_unusable_judge_fails_before_anything_is_generated(mode, judge_fault, tmp_path, monkeypatch, capsys):
    from megatron_sami.cli.eval import main

    test, baseline = write_fake_models(tmp_path)
    monkeypatch.setenv("SAMI_TEST_JUDGE_KEY", "sk-wrong")
    server = FakeJudge(api_key=SECRET)
    url = server.url
    if judge_fault == "down":
        server.stop()
    where = (["--test", str(test), "--baseline-model", str(baseline), "--out", str(tmp_path / "out")]
             if mode == "models" else ["--run-dir", str(tmp_path / "run")])
    try:  # in-process, to keep it fast; test_unreachable_judge_is_one_clear_error runs the command itself
        with pytest.raises(SystemExit) as exit_info:
            main(["winrate", *where, "--judge-url", url, "--judge-model", "judge", "--judge-api-key-env",
                  "SAMI_TEST_JUDGE_KEY", "--num-queries", "2"])
    finally:
        server.stop()
    stderr = capsys.readouterr().err
    expected = "cannot reach the judge" if judge_fault == "down" else "refused the API key"
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and expected in errors[0], stderr[-2000:]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()
