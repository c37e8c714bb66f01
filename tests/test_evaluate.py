"""The eval runner's retry rules and the report files (ollama_ft/evaluate.py).

The server here is a few lines of http.server on 127.0.0.1 that answers /api/chat from a script
(503 then 200, or 404); it tests only our retry logic. Runs against a real Ollama are in the e2e suite.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ollama_ft import evaluate
from ollama_ft.console import eval_table
from ollama_ft.errors import OllamaError
from ollama_ft.eval_suite import Suite
from ollama_ft.evaluate import compare_reports, evaluate_model, load_report, write_report

CHAT_OK = {
    "model": "tiny", "created_at": "2025-01-01T00:00:00Z", "done": True, "done_reason": "stop",
    "message": {"role": "assistant", "content": "Türkiye'nin başkenti Ankara'dır."},
    "prompt_eval_count": 12, "eval_count": 8, "eval_duration": 40_000_000, "total_duration": 90_000_000,
}


class ScriptedServer:
    """Answers each POST /api/chat with the next (status, body) of `script`; the last one repeats."""

    def __init__(self, script: list[tuple[int, dict]]):
        self.script, self.requests = script, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                status, payload = outer.script[min(len(outer.requests), len(outer.script)) - 1]
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluate.time, "sleep", lambda s: None)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ScriptedServer]:
    srv = ScriptedServer(request.param)
    yield srv
    srv.close()


def one_case_suite(held_in: bool = False) -> Suite:
    return Suite.model_validate({"name": "mini", "case": [
        {"id": "capital", "category": "factual", "held_in": held_in, "prompt": "Türkiye'nin başkenti neresidir?",
         "checks": [{"type": "contains", "value": "Ankara"}, {"type": "turkish"}]},
    ]})


@pytest.mark.parametrize("server", [[(503, {"error": "server busy"}), (200, CHAT_OK)]], indirect=True)
def test_retries_a_503_then_succeeds(server: ScriptedServer) -> None:
    seen = []
    report = evaluate_model(server.host, "tiny", one_case_suite(), retries=2, progress=lambda d, t: seen.append((d, t)))
    assert len(server.requests) == 2
    path, body = server.requests[-1]
    assert path == "/api/chat" and body["model"] == "tiny"
    assert body["options"] == {"temperature": 0.0, "seed": 42, "num_predict": 128}
    assert body["messages"] == [{"role": "user", "content": "Türkiye'nin başkenti neresidir?"}]
    case = report.cases[0]
    assert case.passed and case.attempts == 2 and case.error is None
    assert (case.prompt_eval_count, case.eval_count, case.tokens_per_s) == (12, 8, 200.0)
    assert report.pass_rate == 1.0 and report.held_out_pass_rate == 1.0 and report.held_in_pass_rate is None
    assert seen == [(1, 1)]


# A thinking model on Ollama 0.12.5+ (the shape of api.ChatResponse there): the reasoning comes
# back in message.thinking, the answer in message.content.
CHAT_THINKING = {**CHAT_OK, "message": {"role": "assistant", "content": "Bilmiyorum.",
                                        "thinking": "Başkent Ankara, ama kısa cevap vereyim."}}


@pytest.mark.parametrize("server", [[(200, CHAT_THINKING)]], indirect=True)
def test_thinking_is_kept_apart_and_only_the_answer_is_graded(server: ScriptedServer) -> None:
    case = evaluate_model(server.host, "tiny", one_case_suite()).cases[0]
    assert case.reply == "Bilmiyorum." and case.thinking == "Başkent Ankara, ama kısa cevap vereyim."
    assert not case.passed   # "Ankara" is only in the thinking


@pytest.mark.parametrize("server", [[(503, {"error": "overloaded"})]], indirect=True)
def test_persistent_5xx_is_recorded_on_the_case(server: ScriptedServer) -> None:
    report = evaluate_model(server.host, "tiny", one_case_suite(), retries=1)
    assert len(server.requests) == 2
    assert not report.cases[0].passed and "overloaded" in (report.cases[0].error or "")
    assert report.request_errors == 1


@pytest.mark.parametrize("server", [[(404, {"error": "model 'nope' not found"})]], indirect=True)
def test_404_is_not_retried_and_names_the_model(server: ScriptedServer) -> None:
    with pytest.raises(OllamaError) as info:
        evaluate_model(server.host, "nope", one_case_suite(), retries=3)
    assert len(server.requests) == 1
    assert "'nope'" in str(info.value) and "ollama pull nope" in str(info.value) and "ollama list" in str(info.value)


def test_unreachable_server_raises_after_retries() -> None:
    with pytest.raises(OllamaError, match="no answer from the Ollama server.*after 2 attempts"):
        evaluate_model("http://127.0.0.1:9", "tiny", one_case_suite(), retries=1, timeout_s=2)


@pytest.mark.parametrize("server", [[(200, CHAT_OK)]], indirect=True)
def test_reports_written_atomically_and_compared(server: ScriptedServer, tmp_path: Path) -> None:
    after = evaluate_model(server.host, "tiny", one_case_suite(held_in=True))
    before = type(after).from_results(
        [c.model_copy(update={"passed": False}) for c in after.cases], model="base", suite="mini",
        host=after.host, started_at=after.started_at, duration_s=0.0)
    deltas = compare_reports(after, before)
    assert deltas["factual"].delta == 1.0 and deltas["(held-in)"].delta == 1.0
    assert deltas["(held-out)"].delta is None
    md, js = write_report(after, tmp_path / "eval", baseline=before)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["eval-report.json", "eval-report.md"]
    data = json.loads(js.read_text(encoding="utf-8"))
    assert data["comparison"]["baseline_model"] == "base" and data["by_category"] == {"factual": 1.0}
    assert "Ankara" in js.read_text(encoding="utf-8")  # not \u-escaped
    assert "| factual | 1/1 | 100.0% | 0.0% | +100.0 pt |" in md.read_text(encoding="utf-8")
    assert load_report(js).model_dump() == after.model_dump()
    table = eval_table(after, baseline=before)
    assert [c.header for c in table.columns] == ["category", "passed", "rate", "baseline", "change"]
    assert table.row_count == 4


JUDGE_PASS = {**CHAT_OK, "message": {"role": "assistant", "content": "Doğru ve kısa.\nVERDICT: PASS"}}


@pytest.mark.parametrize("server", [[(200, CHAT_OK), (200, JUDGE_PASS)]], indirect=True)
def test_judge_check_goes_to_the_judge_model(server: ScriptedServer) -> None:
    suite = Suite.model_validate({"judge_model": "judge-x", "case": [
        {"id": "j", "category": "factual", "prompt": "Başkent?",
         "checks": [{"type": "judge", "rubric": "Ankara demeli."}]},
    ]})
    report = evaluate_model(server.host, "tiny", suite, concurrency=1)
    (_, answer), (_, judged) = server.requests
    assert answer["model"] == "tiny" and judged["model"] == "judge-x"
    assert "Ankara demeli." in judged["messages"][-1]["content"]
    assert "Türkiye'nin başkenti Ankara'dır." in judged["messages"][-1]["content"]
    outcome = report.cases[0].checks[0].result
    assert outcome.passed and outcome.raw == "Doğru ve kısa.\nVERDICT: PASS" and report.judge_errors == 0
