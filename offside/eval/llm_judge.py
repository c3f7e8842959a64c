"""Optional LLM judge over any OpenAI-compatible chat endpoint: a 0–10 factuality score of an answer
against the reference (the published factuality rubric).

Configured by `LLMJudgeSpec` (url = the API base, e.g. http://127.0.0.1:8000/v1, and the model name).
Scores are cached by (question, answer) in a JSON file, so a rerun does not ask twice. A failure —
unreachable endpoint, HTTP error, a reply without a 0–10 score — is recorded for that item
(`{"score": None, "error": "..."}`) and never raises: the judge only adds `judge_llm/...` numbers and
never touches the deterministic metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import requests

from offside.eval.spec import LLMJudgeSpec  # noqa: F401  (re-exported)

RUBRIC = (
    "You are grading the factual accuracy of an answer against a reference answer. "
    "Score 0–10: 10 = states exactly the reference facts; 5 = partly correct or vague; 0 = wrong, "
    "contradicts the reference, or refuses. Reply with only: Score: <integer 0-10>"
)
_SCORE = re.compile(r"score\s*[:=]\s*(\d{1,2})\b", re.IGNORECASE)


class LLMJudge:
    def __init__(self, spec: LLMJudgeSpec, cache_path: Path, api_key: str | None = None):
        self.spec, self.cache_path, self.api_key = spec, Path(cache_path), api_key
        self.cache: dict[str, dict] = json.loads(self.cache_path.read_text()) if self.cache_path.is_file() else {}
        self.requests_made = 0

    def score(self, question: str, answer: str, reference: str) -> dict:
        """{"score": 0..10 or None, "error": str or None}; cached by (question, answer)."""
        key = hashlib.sha256(json.dumps([question, answer]).encode()).hexdigest()
        if key in self.cache:
            return self.cache[key]
        result = self._ask(question, answer, reference)
        if result["error"] is None:  # failures are retried on the next run
            self.cache[key] = result
        return result

    def save(self) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache, indent=1, sort_keys=True))
        tmp.replace(self.cache_path)

    def _ask(self, question: str, answer: str, reference: str) -> dict:
        self.requests_made += 1
        body = {"model": self.spec.model, "temperature": 0, "max_tokens": 16, "messages": [
            {"role": "system", "content": RUBRIC},
            {"role": "user", "content": f"Question: {question}\nReference answer: {reference}\nAnswer to grade: {answer}"},
        ]}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            reply = requests.post(self.spec.url.rstrip("/") + "/chat/completions", json=body, headers=headers,
                                  timeout=self.spec.timeout_s)
            reply.raise_for_status()
            text = reply.json()["choices"][0]["message"]["content"]
        except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as err:
            return {"score": None, "error": f"{type(err).__name__}: {str(err)[:200]}"}
        match = _SCORE.search(text if isinstance(text, str) else "")
        if not match or not 0 <= int(match.group(1)) <= 10:
            return {"score": None, "error": f"malformed reply: {str(text)[:200]!r}"}
        return {"score": int(match.group(1)), "error": None}


def judge_records(judge: LLMJudge, records: list[dict], rows_by_id: dict[str, dict]) -> dict[str, float]:
    """Adds `llm_score` / `llm_error` to generation records; returns judge_llm/<attack>/mean_score
    (over scored items) and judge_llm/<attack>/errors (count)."""
    scores: dict[str, list[int]] = {}
    errors: dict[str, int] = {}
    for rec in records:
        if rec["form"] != "gen":
            continue
        row = rows_by_id[rec["id"]]
        result = judge.score(row["question"], rec["answer"], row["answer"])
        rec["llm_score"], rec["llm_error"] = result["score"], result["error"]
        errors[rec["attack"]] = errors.get(rec["attack"], 0) + (result["error"] is not None)
        if result["score"] is not None:
            scores.setdefault(rec["attack"], []).append(result["score"])
    judge.save()
    out = {f"judge_llm/{a}/errors": float(n) for a, n in errors.items()}
    out |= {f"judge_llm/{a}/mean_score": sum(v) / len(v) for a, v in scores.items()}
    return out
