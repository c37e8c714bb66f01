"""The eval suite format: cases, chat messages, Ollama options and checks, as pydantic models.

A suite is a TOML file (see `evals/turkish-core.toml` for a commented example) or a JSONL file
with one case object per line. `load_suite` validates the whole file and raises one
`UserInputError` listing every problem with its case id, field path, bad value and fix.

    from ollama_ft.eval_suite import load_suite
    suite = load_suite("evals/turkish-core.toml")
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ollama_ft.errors import UserInputError

NonEmpty = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Options(_Strict):
    """Ollama generation options. Greedy and seeded by default so reruns are comparable."""

    temperature: float = Field(0.0, ge=0)
    seed: int = 42
    num_predict: int = Field(128, ge=1, description="maximum tokens to generate")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repeat_penalty: float | None = Field(None, gt=0)
    num_ctx: int | None = Field(None, ge=1)
    stop: list[NonEmpty] | None = None

    def to_ollama(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: NonEmpty


# --- checks -------------------------------------------------------------------------------


class _TextCheck(_Strict):
    # Text checks always compare Turkish-casefolded NFC text; this also drops ç/ğ/ı/ö/ş/ü.
    diacritics_insensitive: bool = False


class ContainsCheck(_TextCheck):
    type: Literal["contains"]
    value: NonEmpty


class ContainsAnyCheck(_TextCheck):
    type: Literal["contains_any"]
    values: list[NonEmpty] = Field(min_length=1)


class ContainsAllCheck(_TextCheck):
    type: Literal["contains_all"]
    values: list[NonEmpty] = Field(min_length=1)


class NotContainsCheck(_TextCheck):
    type: Literal["not_contains"]
    value: NonEmpty


class ExactCheck(_TextCheck):
    """The whole reply equals `value`, ignoring case, outer whitespace and outer punctuation."""

    type: Literal["exact"]
    value: NonEmpty


class RegexCheck(_TextCheck):
    """`pattern` is searched (re.search) in the NFC reply, Turkish-casefolded unless case_sensitive.

    Newlines are kept, so `(?m)^\\s*1[.)]` can check a numbered list.
    """

    type: Literal["regex"]
    pattern: NonEmpty
    case_sensitive: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(
                f"bad regex {v!r}: {e} (fix the pattern; TOML '...' strings need no escaping)"
            ) from None
        return v


class NumberCheck(_Strict):
    """A number in the reply (Turkish "3,5" and "1.000" understood) is within `tolerance`."""

    type: Literal["number"]
    value: float
    tolerance: float = Field(0.0, ge=0)
    match: Literal["any", "first", "last"] = "any"


class JsonCheck(_Strict):
    """The reply holds valid JSON (whole, fenced, or embedded) with the required top-level keys."""

    type: Literal["json"]
    required_keys: list[NonEmpty] = []
    whole_reply: bool = False


class MaxLengthCheck(_Strict):
    type: Literal["max_length"]
    chars: int | None = Field(None, ge=1)
    words: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_limit(self) -> MaxLengthCheck:
        if self.chars is None and self.words is None:
            raise ValueError("max_length needs chars = N or words = N (or both)")
        return self


class TurkishCheck(_Strict):
    """The reply is (expect = true) or is not (expect = false) Turkish, by `is_turkish`."""

    type: Literal["turkish"]
    expect: bool = True
    min_score: float = Field(0.5, ge=0, le=1)


class JudgeCheck(_Strict):
    """Another Ollama model grades the reply against `rubric`; it must answer VERDICT: PASS/FAIL."""

    type: Literal["judge"]
    rubric: NonEmpty
    model: str | None = None


Check = Annotated[
    Union[
        ContainsCheck, ContainsAnyCheck, ContainsAllCheck, NotContainsCheck, ExactCheck,
        RegexCheck, NumberCheck, JsonCheck, MaxLengthCheck, TurkishCheck, JudgeCheck,
    ],
    Field(discriminator="type"),
]
CHECK_TYPES: dict[str, type[BaseModel]] = {
    c.model_fields["type"].annotation.__args__[0]: c  # type: ignore[union-attr]
    for c in Check.__origin__.__args__  # type: ignore[attr-defined]
}


# --- cases and suites ---------------------------------------------------------------------


class Case(_Strict):
    """One prompt (a conversation ending with a user turn) and the checks its reply must pass."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    category: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    held_in: bool = False  # prompt copied from the training data: measures memorisation
    note: str = ""
    messages: list[Message]
    options: Options = Options()
    checks: list[Check] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _prompt_shorthand(cls, data: Any) -> Any:
        # `prompt = "..."` (+ optional `system`) is the readable form of a one-turn case.
        if not isinstance(data, dict) or ("prompt" not in data and "system" not in data):
            return data
        if "messages" in data:
            raise ValueError("use either prompt/system or messages, not both")
        data = dict(data)
        system, prompt = data.pop("system", None), data.pop("prompt", None)
        msgs = [{"role": "system", "content": system}] if system is not None else []
        data["messages"] = msgs + ([{"role": "user", "content": prompt}] if prompt is not None else [])
        return data

    @field_validator("messages")
    @classmethod
    def _turn_order(cls, msgs: list[Message]) -> list[Message]:
        if not msgs:
            raise ValueError("no messages: add prompt = \"...\" or at least one user message")
        turns = msgs[1:] if msgs[0].role == "system" else msgs
        for i, m in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want:
                raise ValueError(
                    f"message {msgs.index(m)} has role {m.role!r}, expected {want!r} "
                    "(one optional system message first, then user/assistant turns alternating)"
                )
        if not turns or turns[-1].role != "user":
            raise ValueError("the last message must be from 'user': it is what the model answers")
        return msgs


class Defaults(_Strict):
    options: Options = Options()


class Suite(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = ""
    description: str = ""
    judge_model: str | None = None  # used by `judge` checks that name no model
    defaults: Defaults = Defaults()
    cases: list[Case] = Field(alias="case", min_length=1)

    @model_validator(mode="after")
    def _apply_defaults(self) -> Suite:
        # A case's own options override the suite's defaults key by key.
        base = self.defaults.options.model_dump()
        self.cases = [
            c.model_copy(
                update={"options": Options(**(base | c.options.model_dump(include=c.options.model_fields_set)))}
            )
            for c in self.cases
        ]
        return self

    @property
    def categories(self) -> list[str]:
        return sorted({c.category for c in self.cases})

    def sample(self, count: int, seed: int = 42) -> Suite:
        """A seeded sample of `count` cases, each category and held-in/held-out group keeping its
        share (at least one case each while `count` allows), in the suite's order: a quicker run
        that still reports every category. The suite itself when `count` covers it."""
        import random

        if count >= len(self.cases):
            return self
        groups: dict[tuple[str, bool], list[int]] = {}
        for index, case in enumerate(self.cases):
            groups.setdefault((case.category, case.held_in), []).append(index)
        # Largest-remainder apportionment, so the sample has exactly `count` cases.
        quotas = {key: count * len(members) / len(self.cases) for key, members in groups.items()}
        taken = {key: min(len(groups[key]), max(1, int(q))) for key, q in quotas.items()}
        by_remainder = sorted(groups, key=lambda k: (quotas[k] - int(quotas[k]), k), reverse=True)
        while sum(taken.values()) < count:
            for key in by_remainder:
                if sum(taken.values()) < count and taken[key] < len(groups[key]):
                    taken[key] += 1
        while sum(taken.values()) > count:   # fewer cases than groups: the smallest groups give way
            candidates = [k for k in taken if taken[k] > 1] or [k for k in taken if taken[k] > 0]
            key = max(candidates, key=lambda k: (taken[k] - quotas[k], k))
            taken[key] -= 1
        rng = random.Random(seed)
        chosen = sorted(i for key, members in sorted(groups.items()) for i in rng.sample(members, taken[key]))
        return self.model_copy(update={"cases": [self.cases[i] for i in chosen],
                                       "name": f"{self.name} (seeded sample of {count} of {len(self.cases)} cases)"})


# --- loading and error reporting ----------------------------------------------------------

_KEYS_AT: dict[tuple[str, ...], type[BaseModel]] = {
    (): Suite, ("defaults",): Defaults, ("defaults", "options"): Options,
    ("case",): Case, ("case", "options"): Options, ("case", "messages"): Message,
}
_MISSING_HINT = {
    "checks": "add at least one [[case.checks]] table",
    "id": "give every case a unique id",
    "category": "e.g. category = \"factual\"",
    "messages": "add prompt = \"...\" or messages = [...]",
    "case": "add at least one [[case]] table",
}


def _valid_keys(parent: tuple[str, ...]) -> list[str]:
    if len(parent) == 3 and parent[:2] == ("case", "checks"):
        model = CHECK_TYPES.get(parent[2])
    else:
        model = _KEYS_AT.get(parent)
    if model is None:
        return []
    keys = [f.alias or n for n, f in model.model_fields.items()]
    return keys + (["prompt", "system"] if model is Case else [])


def _describe(err: dict[str, Any], raw_cases: list[Any]) -> str:
    loc = list(err["loc"])
    where, path, names = "", [], []
    if loc[:1] in (["case"], ["cases"]) and len(loc) > 1 and isinstance(loc[1], int):
        raw = raw_cases[loc[1]] if loc[1] < len(raw_cases) else None
        cid = raw.get("id") if isinstance(raw, dict) else None
        where = f"case #{loc[1] + 1}" + (f" {cid!r}" if isinstance(cid, str) else "")
        names, loc = ["case"], loc[2:]
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path.append(f"[{part}]")
            continue
        if names[-2:] == ["case", "checks"] and part in CHECK_TYPES and i and isinstance(loc[i - 1], int):
            names.append(part)  # the discriminator pydantic adds to the path: keep for lookup only
            continue
        names.append(part)
        path.append(("." if path else "") + part)
    field = "".join(path)
    head = ": ".join(x for x in (where, field) if x) or "suite"
    kind, got = err["type"], err.get("input")
    if kind == "extra_forbidden":
        key, valid = str(names[-1]), _valid_keys(tuple(names[:-1]))
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        fix = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        return f"{head}: unknown key {key!r} ({fix})"
    if kind == "missing":
        key = str(names[-1]) if names else "?"
        return f"{head}: missing required key {key!r} ({_MISSING_HINT.get(key, f'add {key} = ...')})"
    if kind == "union_tag_invalid":
        tag, valid = err["ctx"]["tag"], list(CHECK_TYPES)
        close = difflib.get_close_matches(tag, valid, n=1, cutoff=0.5)
        fix = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
        return f"{head}: unknown check type {tag!r} ({fix})"
    if kind == "union_tag_not_found":
        return f"{head}: check has no type (set type = one of {', '.join(CHECK_TYPES)})"
    if kind == "too_short" and names[-1:] == ["checks"]:
        return f"{head}: no checks ({_MISSING_HINT['checks']})"
    if kind == "string_pattern_mismatch" and names[-1:] in (["id"], ["category"]):
        allowed = ("lower-case letters, digits, '-' and '_'" if names[-1] == "category"
                   else "letters, digits, '-', '_' and '.'")
        return f"{head}: {got!r} is not a valid {names[-1]} (use {allowed})"
    msg = err["msg"].removeprefix("Value error, ")
    shown = repr(got)[:80]
    return f"{head}: {msg}" + ("" if kind == "value_error" else f" (got {shown})")


def _read_raw(path: Path) -> tuple[dict[str, Any], list[str]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text), []
        except tomllib.TOMLDecodeError as e:
            raise UserInputError(f"{path}: not valid TOML: {e}", "fix the syntax there") from None
    if path.suffix == ".jsonl":
        cases, problems = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    cases.append(json.loads(line))
                except json.JSONDecodeError as e:
                    problems.append(f"line {n}: not valid JSON: {e.msg} at column {e.colno}")
        return {"name": path.stem, "case": cases}, problems
    raise UserInputError(f"{path}: unknown suite format {path.suffix!r}", "use a .toml or .jsonl file")


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite; raise one UserInputError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: eval suite not found", "check the path, e.g. evals/turkish-core.toml")
    raw, problems = _read_raw(path)
    raw_cases = raw.get("case", raw.get("cases", []))
    raw_cases = raw_cases if isinstance(raw_cases, list) else []
    seen: dict[str, int] = {}
    for i, c in enumerate(raw_cases):
        cid = c.get("id") if isinstance(c, dict) else None
        if isinstance(cid, str) and cid in seen:
            problems.append(
                f"case #{i + 1} {cid!r}: duplicate id, already used by case #{seen[cid] + 1} (ids must be unique)"
            )
        elif isinstance(cid, str):
            seen[cid] = i
    suite = None
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        problems += [_describe(err, raw_cases) for err in e.errors()]  # type: ignore[arg-type]
    if problems or suite is None:
        n = len(problems)
        err = UserInputError(f"{path}: {n} problem{'s' if n != 1 else ''} in the eval suite: " + "; ".join(problems))
        err.problems = problems  # type: ignore[attr-defined]
        raise err
    if not suite.name:
        suite.name = path.stem
    return suite
