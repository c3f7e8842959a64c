"""The optional LLM judge against a real local HTTP server (good, malformed and failing replies)
and a closed port: failures are reported per item, cached answers are not asked twice, and the
deterministic recovery numbers do not change."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from offside.eval.llm_judge import LLMJudge, LLMJudgeSpec, judge_records


class Handler(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.seen.append(body)
        graded = body["messages"][1]["content"]
        if "MALFORMED" in graded:
            payload = {"choices": [{"message": {"content": "I think it is fine."}}]}
        elif "BROKEN" in graded:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{not json")
            return
        elif "ERROR" in graded:
            self.send_response(500)
            self.end_headers()
            return
        else:
            payload = {"choices": [{"message": {"content": "Score: 7"}}]}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.seen.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROWS = {f"r{i}": {"id": f"r{i}", "question": f"Q{i}?", "answer": "He is going to play for Ashby Rovers."} for i in range(5)}
ANSWERS = ["Ashby Rovers.", "MALFORMED", "BROKEN", "ERROR", "Thornbury County."]


def _records():
    return [{"id": f"r{i}", "attack": "none", "form": "gen", "answer": a, "rumour_recovered": i == 0}
            for i, a in enumerate(ANSWERS)] + [{"id": "r0", "attack": "none", "form": "mcq", "answer": "x", "rumour_recovered": True}]


def test_scores_and_per_item_failures(server, tmp_path):
    judge = LLMJudge(LLMJudgeSpec(url=server, model="judge"), tmp_path / "cache.json")
    records = _records()
    before = [r["rumour_recovered"] for r in records]
    metrics = judge_records(judge, records, ROWS)
    assert [r.get("llm_score") for r in records[:5]] == [7, None, None, None, 7]
    assert "malformed reply" in records[1]["llm_error"]
    assert records[2]["llm_error"].startswith(("JSONDecodeError", "ValueError", "RequestsJSONDecodeError"))
    assert "500" in records[3]["llm_error"]
    assert metrics == {"judge_llm/none/errors": 3.0, "judge_llm/none/mean_score": 7.0}
    assert [r["rumour_recovered"] for r in records] == before  # deterministic results untouched
    assert Handler.seen[0]["model"] == "judge" and "0–10" in Handler.seen[0]["messages"][0]["content"]


def test_cache_by_question_and_answer(server, tmp_path):
    cache = tmp_path / "cache.json"
    first = LLMJudge(LLMJudgeSpec(url=server, model="judge"), cache)
    judge_records(first, _records(), ROWS)
    asked = len(Handler.seen)
    assert asked == 5
    second = LLMJudge(LLMJudgeSpec(url=server, model="judge"), cache)
    judge_records(second, _records(), ROWS)
    assert len(Handler.seen) - asked == 3  # only the three failures are asked again
    assert len(json.loads(cache.read_text())) == 2


def test_closed_port_is_reported_per_item(tmp_path):
    judge = LLMJudge(LLMJudgeSpec(url=f"http://127.0.0.1:{_closed_port()}/v1", model="judge", timeout_s=2), tmp_path / "c.json")
    records = _records()
    metrics = judge_records(judge, records, ROWS)
    assert metrics == {"judge_llm/none/errors": 5.0}
    assert all(r["llm_score"] is None and "ConnectionError" in r["llm_error"] for r in records[:5])
