"""Run an eval suite against a model served by Ollama and write the report.

    from ollama_ft.eval_suite import load_suite
    from ollama_ft.evaluate import evaluate_model, write_report
    report = evaluate_model("http://127.0.0.1:11434", "tiny-tr", load_suite("evals/turkish-core.toml"))
    md_path, json_path = write_report(report, "runs/demo/eval")

Each case goes through the official client (`ollama.Client.chat`), a few at a time. Connection
failures and 5xx answers are retried with backoff; a 4xx (model not found, bad request) stops
the whole run at once with an `OllamaError`, since every other case would fail the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from ollama_ft.errors import OllamaError
from ollama_ft.eval_checks import CheckResult, build_judge_messages, run_check
from ollama_ft.eval_suite import Case, JudgeCheck, Options, Suite
from ollama_ft.formatting import markdown_table
from ollama_ft.runs import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    import ollama

Progress = Callable[[int, int], None]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckOutcome(_Model):
    type: str
    result: CheckResult


class CaseResult(_Model):
    id: str
    category: str
    held_in: bool
    prompt: str  # the last user message, for the report
    reply: str | None  # the answer (message.content): what the checks grade
    thinking: str | None = None  # message.thinking, kept apart (thinking models on Ollama 0.12.5+)
    passed: bool
    checks: list[CheckOutcome] = []
    error: str | None = None  # the request failed after all retries; the case counts as failed
    latency_s: float = 0.0
    attempts: int = 0
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    tokens_per_s: float | None = None


class Rate(_Model):
    passed: int
    total: int
    rate: float | None  # None when there are no cases of this kind

    @classmethod
    def of(cls, subset: list[CaseResult]) -> Rate:
        passed = sum(c.passed for c in subset)
        return cls(passed=passed, total=len(subset), rate=round(passed / len(subset), 4) if subset else None)


class EvalReport(_Model):
    model: str
    suite: str
    host: str
    started_at: str
    duration_s: float
    # Flat figures first: what metrics.json and `compare` read. The Rate objects hold the counts.
    pass_rate: float | None
    held_in_pass_rate: float | None
    held_out_pass_rate: float | None
    by_category: dict[str, float | None]
    tokens_per_second: float | None  # mean over cases of eval_count / eval_duration
    judge_errors: int
    request_errors: int
    overall: Rate
    held_in: Rate
    held_out: Rate
    per_category: dict[str, Rate]
    cases: list[CaseResult]

    @classmethod
    def from_results(cls, cases: list[CaseResult], **meta: Any) -> EvalReport:
        speeds = [c.tokens_per_s for c in cases if c.tokens_per_s]
        overall = Rate.of(cases)
        held_in = Rate.of([c for c in cases if c.held_in])
        held_out = Rate.of([c for c in cases if not c.held_in])
        per_category = {k: Rate.of([c for c in cases if c.category == k]) for k in sorted({c.category for c in cases})}
        return cls(
            pass_rate=overall.rate, held_in_pass_rate=held_in.rate, held_out_pass_rate=held_out.rate,
            by_category={k: r.rate for k, r in per_category.items()},
            tokens_per_second=round(sum(speeds) / len(speeds), 2) if speeds else None,
            judge_errors=sum(o.result.error for c in cases for o in c.checks),
            request_errors=sum(c.error is not None for c in cases),
            overall=overall, held_in=held_in, held_out=held_out, per_category=per_category, cases=cases,
            **meta,
        )


# --- talking to Ollama --------------------------------------------------------------------


def _is_transient(exc: Exception) -> bool:
    import httpx
    import ollama

    if isinstance(exc, ollama.ResponseError):
        return exc.status_code >= 500 or exc.status_code == 429
    return isinstance(exc, (ConnectionError, httpx.TransportError))


def _chat_with_retries(client: ollama.Client, model: str, messages: list[dict[str, str]], options: dict[str, Any],
                       retries: int, host: str) -> tuple[Any, int]:
    """(response, attempts). Raises OllamaError for 4xx and for an unreachable server."""
    import ollama

    for attempt in range(retries + 1):
        try:
            return client.chat(model=model, messages=messages, options=options), attempt + 1
        except Exception as exc:
            if isinstance(exc, ollama.ResponseError) and exc.status_code == 404:
                raise OllamaError(
                    f"model {model!r} not found on the Ollama server at {host}: {exc.error}",
                    f"run `ollama list` to see the models there, or `ollama pull {model}`",
                ) from None
            if isinstance(exc, ollama.ResponseError) and not _is_transient(exc):
                raise OllamaError(f"Ollama at {host} refused the request for {model!r}: {exc}") from None
            if not _is_transient(exc):
                raise OllamaError(f"request to Ollama at {host} failed: {type(exc).__name__}: {exc}") from exc
            if attempt == retries:
                if isinstance(exc, ollama.ResponseError):
                    raise  # a server error on this case: recorded on the case by the caller
                raise OllamaError(
                    f"no answer from the Ollama server at {host} after {attempt + 1} attempts: {exc}",
                    "is `ollama serve` running there? check --host",
                ) from None
            time.sleep(min(0.5 * 2**attempt, 8.0))  # backoff: 0.5 s, 1 s, 2 s …
    raise AssertionError("unreachable")


# Room for a short reasoning before the verdict line.
_JUDGE_OPTIONS = Options(num_predict=512).to_ollama()


def _run_case(client: ollama.Client, host: str, model: str, case: Case, judge_model: str | None,
              retries: int) -> CaseResult:
    import ollama

    messages = [m.model_dump() for m in case.messages]
    started = time.perf_counter()
    base = dict(id=case.id, category=case.category, held_in=case.held_in, prompt=case.messages[-1].content)
    try:
        resp, attempts = _chat_with_retries(client, model, messages, case.options.to_ollama(), retries, host)
    except ollama.ResponseError as exc:
        return CaseResult(**base, reply=None, passed=False, error=str(exc), attempts=retries + 1,
                          latency_s=round(time.perf_counter() - started, 3))
    latency = round(time.perf_counter() - started, 3)
    reply = resp.message.content or ""
    # From 0.12.5 a thinking model thinks unless told not to, and the server returns that apart
    # from the answer; only the answer is graded.
    thinking = getattr(resp.message, "thinking", None) or None

    def judge(check: JudgeCheck, text: str) -> str:
        name = check.model or judge_model
        if not name:
            raise ValueError("no judge model: set judge_model in the suite or model in the check")
        jr, _ = _chat_with_retries(client, name, build_judge_messages(check, case.messages, text),
                                   _JUDGE_OPTIONS, retries, host)
        return jr.message.content or ""

    outcomes = [CheckOutcome(type=c.type, result=run_check(c, reply, judge=judge)) for c in case.checks]
    speed = None
    if resp.eval_count and resp.eval_duration:
        speed = round(resp.eval_count / (resp.eval_duration / 1e9), 2)
    return CaseResult(
        **base, reply=reply, thinking=thinking, checks=outcomes, passed=all(o.result.passed for o in outcomes),
        latency_s=latency, attempts=attempts, prompt_eval_count=resp.prompt_eval_count,
        eval_count=resp.eval_count, tokens_per_s=speed,
    )


def evaluate_model(client_host: str, model: str, suite: Suite, *, concurrency: int = 2, retries: int = 2,
                   progress: Progress | None = None, judge_model: str | None = None,
                   timeout_s: float = 300.0) -> EvalReport:
    """Send every case of `suite` to `model` and grade the replies. Cases keep the suite's order."""
    import ollama

    client = ollama.Client(host=client_host, timeout=timeout_s)
    started, t0 = datetime.now(UTC), time.perf_counter()
    results: dict[str, CaseResult] = {}
    total = len(suite.cases)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = [pool.submit(_run_case, client, client_host, model, c, judge_model or suite.judge_model, retries)
                   for c in suite.cases]
        try:
            for fut in as_completed(futures):
                res = fut.result()
                results[res.id] = res
                if progress:
                    progress(len(results), total)
        except BaseException:
            # One fatal error (model missing, server gone) makes the rest pointless.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return EvalReport.from_results(
        [results[c.id] for c in suite.cases], model=model, suite=suite.name, host=client_host,
        started_at=started.isoformat(timespec="seconds"), duration_s=round(time.perf_counter() - t0, 2),
    )


# --- comparing and writing ----------------------------------------------------------------


class RateDelta(_Model):
    after: float | None
    baseline: float | None
    delta: float | None


def compare_reports(after: EvalReport, baseline: EvalReport) -> dict[str, RateDelta]:
    """Pass-rate change per category, plus "(held-in)", "(held-out)" and "(overall)" rows."""
    rows = {k: (after.per_category.get(k), baseline.per_category.get(k))
            for k in sorted(set(after.per_category) | set(baseline.per_category))}
    rows |= {"(held-in)": (after.held_in, baseline.held_in), "(held-out)": (after.held_out, baseline.held_out),
             "(overall)": (after.overall, baseline.overall)}
    out = {}
    for key, (a, b) in rows.items():
        ra, rb = a.rate if a else None, b.rate if b else None
        out[key] = RateDelta(after=ra, baseline=rb, delta=None if ra is None or rb is None else round(ra - rb, 4))
    return out


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def summary_columns(baseline: EvalReport | None = None) -> list[str]:
    """The header of `summary_rows`."""
    return ["category", "passed", "rate"] + (["baseline", "change"] if baseline else [])


def summary_rows(report: EvalReport, baseline: EvalReport | None = None) -> list[list[str]]:
    """One row per category, then (held-in), (held-out) and (overall): for eval-report.md and the terminal."""
    deltas = compare_reports(report, baseline) if baseline else {}
    rows = []
    named = list(report.per_category.items()) + [
        ("(held-in)", report.held_in), ("(held-out)", report.held_out), ("(overall)", report.overall)]
    for key, r in named:
        row = [key, f"{r.passed}/{r.total}", _pct(r.rate)]
        if baseline:
            d = deltas[key]
            sign = "" if d.delta is None else ("+" if d.delta >= 0 else "")
            row += [_pct(d.baseline), "–" if d.delta is None else f"{sign}{100 * d.delta:.1f} pt"]
        rows.append(row)
    return rows


def _markdown(report: EvalReport, baseline: EvalReport | None) -> str:
    speed = "–" if report.tokens_per_second is None else f"{report.tokens_per_second:.1f}"
    lines = [f"# Eval: {report.model} on {report.suite}", "",
             f"Host {report.host}, started {report.started_at}, {report.duration_s:.1f} s; "
             f"mean {speed} tokens/s; request errors {report.request_errors}, "
             f"judge errors {report.judge_errors}.", "",
             "Held-in cases reuse prompts from the training data (memorisation); held-out cases do not.", ""]
    lines += markdown_table(summary_columns(baseline), summary_rows(report, baseline))
    failed = [c for c in report.cases if not c.passed]
    lines += ["", f"## Failed cases ({len(failed)})", ""]
    for c in failed:
        reply = (c.reply or "").replace("\n", " ").replace("`", "'")[:200]
        lines.append(f"- **{c.id}** ({c.category}{', held-in' if c.held_in else ''}): reply `{reply}`"
                     + (f"; error: {c.error}" if c.error else ""))
        for o in c.checks:
            if not o.result.passed:
                said = (o.result.raw or "").replace("`", "'").replace("\n", " ")[:200]
                raw = f" (judge said: `{said}`)" if o.result.error and said else ""
                lines.append(f"  - {o.type}: {o.result.detail}{raw}")
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out_dir: str | Path, baseline: EvalReport | None = None) -> tuple[Path, Path]:
    """Write eval-report.md and eval-report.json into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "eval-report.md", out / "eval-report.json"
    data = report.model_dump(mode="json")
    if baseline is not None:
        data["comparison"] = {"baseline_model": baseline.model,
                              "deltas": {k: v.model_dump() for k, v in compare_reports(report, baseline).items()}}
    atomic_write_json(json_path, data)
    atomic_write_text(md_path, _markdown(report, baseline))
    return md_path, json_path


def load_report(json_path: str | Path) -> EvalReport:
    """Read a report written by `write_report` (e.g. to use it as a baseline)."""
    import json

    from ollama_ft.errors import UserInputError

    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
        data.pop("comparison", None)
        return EvalReport.model_validate(data)
    except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise UserInputError(f"{json_path}: not a readable eval report: {str(e).splitlines()[0]}",
                             "pass the eval-report.json written by an earlier eval") from None
