"""Pure functions that grade one model reply against one check of the eval suite.

No server is needed: the `judge` check calls a judge function that the runner injects, so
every check can be tested with plain strings.

    >>> from ollama_ft.eval_suite import ContainsCheck
    >>> run_check(ContainsCheck(type="contains", value="İstanbul"), "ISTANBUL değil, İSTANBUL.").passed
    True
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from ollama_ft.eval_suite import (
    Check,
    ContainsAllCheck,
    ContainsAnyCheck,
    ContainsCheck,
    ExactCheck,
    JsonCheck,
    JudgeCheck,
    MaxLengthCheck,
    Message,
    NotContainsCheck,
    NumberCheck,
    RegexCheck,
    TurkishCheck,
)
from ollama_ft.turkish import (
    casefold_tr,
    fold_punctuation,
    fold_whitespace,
    is_turkish,
    nfc,
    normalise,
    strip_diacritics_tr,
)

# The runner supplies this: given the check and the reply, return the judge model's raw text.
Judge = Callable[[JudgeCheck, str], str]


class CheckResult(BaseModel):
    """The verdict of one check. `error` means the check itself could not run (judge failure)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    detail: str
    error: bool = False
    raw: str | None = None  # the judge's unparsed reply, kept for the report


def _short(s: str, n: int = 60) -> str:
    s = fold_whitespace(s)
    return repr(s if len(s) <= n else s[: n - 1] + "…")


def _norm(check: Any, s: str) -> str:
    return normalise(s, diacritics=getattr(check, "diacritics_insensitive", False))


def _contains(c: ContainsCheck, reply: str) -> CheckResult:
    ok = _norm(c, c.value) in _norm(c, reply)
    return CheckResult(passed=ok, detail=f"{'contains' if ok else 'missing'} {_short(c.value)}")


def _contains_any(c: ContainsAnyCheck, reply: str) -> CheckResult:
    text = _norm(c, reply)
    hits = [v for v in c.values if _norm(c, v) in text]
    if hits:
        return CheckResult(passed=True, detail=f"contains {_short(hits[0])}")
    return CheckResult(passed=False, detail=f"none of {len(c.values)} values found: {_short(', '.join(c.values))}")


def _contains_all(c: ContainsAllCheck, reply: str) -> CheckResult:
    text = _norm(c, reply)
    missing = [v for v in c.values if _norm(c, v) not in text]
    if not missing:
        return CheckResult(passed=True, detail=f"contains all {len(c.values)} values")
    return CheckResult(passed=False, detail=f"missing {_short(', '.join(missing))}")


def _not_contains(c: NotContainsCheck, reply: str) -> CheckResult:
    found = _norm(c, c.value) in _norm(c, reply)
    return CheckResult(passed=not found, detail=f"{'unwanted' if found else 'absent:'} {_short(c.value)}")


_OUTER = string.punctuation + string.whitespace + "…«»"


def _exact(c: ExactCheck, reply: str) -> CheckResult:
    got, want = _norm(c, reply).strip(_OUTER), _norm(c, c.value).strip(_OUTER)
    ok = got == want
    return CheckResult(passed=ok, detail=f"equals {_short(c.value)}" if ok else f"{_short(got)} != {_short(want)}")


def _regex(c: RegexCheck, reply: str) -> CheckResult:
    # Newlines are kept so that (?m)^ can test list layout; case is folded the Turkish way.
    text = fold_punctuation(nfc(reply))
    if c.case_sensitive:
        pattern, flags = c.pattern, 0
    else:
        text, pattern, flags = casefold_tr(text), c.pattern, re.IGNORECASE
    if c.diacritics_insensitive:
        # Only letters change, so the pattern's syntax is untouched.
        text, pattern = strip_diacritics_tr(text), strip_diacritics_tr(pattern)
    m = re.search(pattern, text, flags)
    return CheckResult(passed=bool(m), detail=f"matched {_short(m.group(0))}" if m else f"no match for /{c.pattern}/")


# A digit run may hold dots and commas; a sign counts only at a word start ("1915-1916" is not -1916).
_NUMBER = re.compile(r"(?<![\w.,])([-−]?)(\d(?:[\d.,]*\d)?)")


def parse_number(token: str) -> float | None:
    """Parse one number written the Turkish way first: "3,5" = 3.5, "1.000" = 1000, "1.234,5"."""
    dots, commas = token.count("."), token.count(",")
    if dots and commas:
        dec = "," if token.rfind(",") > token.rfind(".") else "."
        token = token.replace("." if dec == "," else ",", "").replace(",", ".")
    elif commas:
        token = token.replace(",", "") if commas > 1 else token.replace(",", ".")
    elif dots > 1 or re.fullmatch(r"\d{1,3}\.\d{3}", token):
        token = token.replace(".", "")
    try:
        return float(token)
    except ValueError:
        return None


def extract_numbers(text: str) -> list[float]:
    out = []
    for sign, digits in _NUMBER.findall(nfc(text)):
        value = parse_number(digits)
        if value is not None:
            out.append(-value if sign else value)
    return out


def _number(c: NumberCheck, reply: str) -> CheckResult:
    found = extract_numbers(reply)
    if not found:
        return CheckResult(passed=False, detail="no number in the reply")
    pool = {"any": found, "first": found[:1], "last": found[-1:]}[c.match]
    best = min(pool, key=lambda v: abs(v - c.value))
    ok = abs(best - c.value) <= c.tolerance
    want = f"{c.value:g}" + (f" ± {c.tolerance:g}" if c.tolerance else "")
    return CheckResult(passed=ok, detail=f"{best:g} {'within' if ok else 'not'} {want}")


_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(reply: str, *, whole_reply: bool = False) -> Any:
    """The JSON object or array in the reply: the whole reply, a ``` fence, or the first embedded one.

    Raises ValueError when there is none (or, with whole_reply, when the reply is not one).
    """
    text = reply.strip()
    candidates = [text] if whole_reply else [text, *_FENCE.findall(text)]
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except json.JSONDecodeError as e:
            if whole_reply:
                raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
            continue
        # A bare string or number is valid JSON but not what "answer in JSON" asks for.
        if isinstance(value, (dict, list)):
            return value
        if whole_reply:
            raise ValueError(f"the reply is a JSON {type(value).__name__}, not an object or array")
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object or array found")


def _json(c: JsonCheck, reply: str) -> CheckResult:
    try:
        value = extract_json(reply, whole_reply=c.whole_reply)
    except ValueError as e:
        return CheckResult(passed=False, detail=f"not valid JSON: {e}")
    if not c.required_keys:
        return CheckResult(passed=True, detail=f"valid JSON {type(value).__name__}")
    if not isinstance(value, dict):
        return CheckResult(passed=False, detail=f"JSON is a {type(value).__name__}, expected an object")
    keys = {nfc(k) for k in value}
    missing = [k for k in c.required_keys if nfc(k) not in keys]
    if missing:
        return CheckResult(passed=False, detail=f"JSON lacks keys {missing}")
    return CheckResult(passed=True, detail=f"JSON has keys {c.required_keys}")


def _max_length(c: MaxLengthCheck, reply: str) -> CheckResult:
    chars, words = len(reply.strip()), len(reply.split())
    over = []
    if c.chars is not None and chars > c.chars:
        over.append(f"{chars} chars > {c.chars}")
    if c.words is not None and words > c.words:
        over.append(f"{words} words > {c.words}")
    return CheckResult(passed=not over, detail="; ".join(over) or f"{chars} chars, {words} words")


def _turkish(c: TurkishCheck, reply: str) -> CheckResult:
    verdict, score = is_turkish(reply)
    ok = (verdict and score >= c.min_score) if c.expect else not verdict
    what = "Turkish" if verdict else "not Turkish"
    return CheckResult(passed=ok, detail=f"{what} (score {score:.2f})")


JUDGE_INSTRUCTIONS = (
    "You grade one reply of an assistant against a rubric. Think briefly if you need to, then "
    "end with exactly one line that is either `VERDICT: PASS` or `VERDICT: FAIL`, nothing else "
    "on that line, and do not write the word VERDICT anywhere else."
)
_VERDICT_LINE = re.compile(r"VERDICT: (PASS|FAIL)")


def build_judge_messages(check: JudgeCheck, conversation: list[Message], reply: str) -> list[dict[str, str]]:
    """The chat the runner sends to the judge model for one `judge` check."""
    shown = "\n".join(f"[{m.role}] {m.content}" for m in conversation)
    user = f"Rubric:\n{check.rubric}\n\nConversation:\n{shown}\n\nReply to grade:\n{reply}"
    return [{"role": "system", "content": JUDGE_INSTRUCTIONS}, {"role": "user", "content": user}]


def parse_verdict(raw: str) -> bool | None:
    """PASS -> True, FAIL -> False; None unless exactly one exact verdict line and no other mention."""
    lines = [line.strip() for line in raw.splitlines()]
    exact = [line for line in lines if _VERDICT_LINE.fullmatch(line)]
    mentions = [line for line in lines if "verdict" in line.lower()]
    if len(exact) != 1 or len(mentions) != 1:
        return None
    return exact[0].endswith("PASS")


def _judge(c: JudgeCheck, reply: str, judge: Judge | None) -> CheckResult:
    if judge is None:
        return CheckResult(passed=False, error=True, detail="judge error: no judge model configured")
    try:
        raw = judge(c, reply)
    except Exception as e:  # the judge is another server call; report it, never crash the eval
        return CheckResult(passed=False, error=True, detail=f"judge error: {type(e).__name__}: {e}")
    verdict = parse_verdict(raw)
    if verdict is None:
        return CheckResult(
            passed=False, error=True, raw=raw,
            detail="judge error: reply needs exactly one line 'VERDICT: PASS' or 'VERDICT: FAIL'",
        )
    return CheckResult(passed=verdict, raw=raw, detail=f"judge: {'PASS' if verdict else 'FAIL'}")


_RUNNERS: dict[str, Callable[[Any, str], CheckResult]] = {
    "contains": _contains, "contains_any": _contains_any, "contains_all": _contains_all,
    "not_contains": _not_contains, "exact": _exact, "regex": _regex, "number": _number,
    "json": _json, "max_length": _max_length, "turkish": _turkish,
}


def run_check(check: Check, reply: str, *, judge: Judge | None = None) -> CheckResult:
    """Grade `reply` against one check. Never raises for a bad reply; that is a failed check."""
    if isinstance(check, JudgeCheck):
        return _judge(check, reply, judge)
    return _RUNNERS[check.type](check, reply)
