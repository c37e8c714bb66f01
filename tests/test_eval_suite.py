"""The bundled suite and data files, and how bad suites are reported (ollama_ft/eval_suite.py)."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from ollama_ft.errors import UserInputError
from ollama_ft.eval_checks import run_check
from ollama_ft.eval_suite import ContainsCheck, Suite, load_suite
from ollama_ft.turkish import normalise

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "evals" / "turkish-core.toml"
DATA = ROOT / "data"
CATEGORIES = {"factual", "instruction", "format", "summarisation", "spelling", "safety", "multi_turn"}


@pytest.fixture(scope="module")
def suite() -> Suite:
    return load_suite(SUITE)


@pytest.fixture(scope="module")
def chat_examples() -> list[list[dict[str, str]]]:
    lines = (DATA / "turkish-demo.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines]


# --- the bundled suite --------------------------------------------------------------------


def test_bundled_suite_loads_with_all_categories(suite: Suite) -> None:
    assert len(suite.cases) >= 80
    assert CATEGORIES <= set(suite.categories)
    assert len({c.id for c in suite.cases}) == len(suite.cases)
    for c in suite.cases:
        assert c.options.temperature == 0 and c.options.seed == 42 and c.options.num_predict
    assert sum(not c.held_in for c in suite.cases) >= 80


def test_held_in_cases_match_the_training_data(suite: Suite, chat_examples: list) -> None:
    held_in = [c for c in suite.cases if c.held_in]
    assert len(held_in) >= 12
    by_prompt = {json.dumps(ex[:-1], ensure_ascii=False): ex[-1]["content"] for ex in chat_examples}
    for case in held_in:
        key = json.dumps([m.model_dump() for m in case.messages], ensure_ascii=False)
        assert key in by_prompt, f"{case.id}: prompt is not verbatim in data/turkish-demo.jsonl"
        answer = by_prompt[key]
        assert all(isinstance(ch, ContainsCheck) for ch in case.checks), case.id
        for ch in case.checks:
            assert normalise(ch.value) in normalise(answer), f"{case.id}: {ch.value!r} not in {answer!r}"
            # Distinctive: the phrase is in the trained answer, not just copied from the prompt.
            assert all(normalise(ch.value) not in normalise(m.content) for m in case.messages), case.id


def test_held_in_checks_pass_on_the_trained_answer_only(suite: Suite, chat_examples: list) -> None:
    # A model that memorised the file passes; one that answers something else fails.
    answers = {json.dumps(ex[:-1], ensure_ascii=False): ex[-1]["content"] for ex in chat_examples}
    unrelated = "Bilmiyorum, lütfen başka bir soru sorun."
    for case in (c for c in suite.cases if c.held_in):
        trained = answers[json.dumps([m.model_dump() for m in case.messages], ensure_ascii=False)]
        assert all(run_check(ch, trained).passed for ch in case.checks), case.id
        assert not all(run_check(ch, unrelated).passed for ch in case.checks), case.id


def test_held_out_prompts_are_not_in_the_training_data(suite: Suite, chat_examples: list) -> None:
    trained = {m["content"] for ex in chat_examples for m in ex if m["role"] == "user"}
    for case in suite.cases:
        if not case.held_in:
            assert case.messages[-1].content not in trained, f"{case.id} should be held_in = true"


# --- bundled data files -------------------------------------------------------------------


def _records(name: str) -> list[dict]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    assert lines and all(line.strip() for line in lines), f"{name}: empty lines"
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            pytest.fail(f"{name}:{n}: not JSON: {e}")
    return out


def _text_ok(s: object) -> bool:
    return isinstance(s, str) and s.strip() != "" and s == unicodedata.normalize("NFC", s)


@pytest.mark.parametrize("path", sorted(DATA.glob("*.jsonl")), ids=lambda p: p.name)
def test_every_data_line_is_a_known_format(path: Path) -> None:
    for n, rec in enumerate(_records(path.name), 1):
        where = f"{path.name}:{n}"
        if set(rec) == {"messages"}:
            msgs = rec["messages"]
            assert isinstance(msgs, list) and len(msgs) >= 2, where
            assert all(set(m) == {"role", "content"} and _text_ok(m["content"]) for m in msgs), where
            roles = [m["role"] for m in msgs]
            turns = roles[1:] if roles[0] == "system" else roles
            assert turns == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0, (where, roles)
        elif set(rec) == {"instruction", "input", "output"}:
            assert _text_ok(rec["instruction"]) and _text_ok(rec["output"]), where
            assert isinstance(rec["input"], str), where  # may be empty, as in Alpaca
        elif set(rec) == {"text"}:
            assert _text_ok(rec["text"]), where
        else:
            pytest.fail(f"{where}: unknown record format with keys {sorted(rec)}")


def test_demo_chat_file_size_and_content(chat_examples: list) -> None:
    path = DATA / "turkish-demo.jsonl"
    assert len(chat_examples) >= 320
    assert path.stat().st_size < 150_000
    firsts = [tuple(m["content"] for m in ex if m["role"] != "assistant") for ex in chat_examples]
    assert len(set(firsts)) == len(firsts), "the same prompt appears twice"
    assert sum(any(m["role"] == "system" for m in ex) for ex in chat_examples) >= 5
    assert sum(len(ex) >= 4 for ex in chat_examples) >= 5  # multi-turn
    text = path.read_text(encoding="utf-8")
    assert all(ch in text for ch in "çğıİöşüÇĞÖŞÜ")
    answers = [ex[-1]["content"] for ex in chat_examples]
    assert sum(len(a.split()) <= 40 for a in answers) / len(answers) > 0.95
    assert len(_records("turkish-demo-alpaca.jsonl")) == 10
    assert len(_records("turkish-demo-text.jsonl")) == 10


# --- bad suites ---------------------------------------------------------------------------

BAD_SUITE = """
name = "bad"
[defaults.options]
temprature = 0.5

[[case]]
id = "one"
category = "factual"
prompt = "Merhaba"
[[case.checks]]
type = "contains"
valu = "x"

[[case]]
id = "one"
category = "factual"
prompt = "Merhaba"
[[case.checks]]
type = "regex"
pattern = "(unclosed"

[[case]]
id = "no-checks"
category = "factual"
prompt = "Merhaba"

[[case]]
id = "bad-turns"
category = "factual"
messages = [{ role = "user", content = "x" }, { role = "assistant", content = "y" }]
[[case.checks]]
type = "contain"
value = "x"

[[case]]
id = "empty"
category = "factual"
messages = []
[[case.checks]]
type = "turkish"
"""


def _problems(tmp_path: Path, text: str, name: str = "suite.toml") -> tuple[str, list[str]]:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserInputError) as info:
        load_suite(path)
    return str(info.value), info.value.problems  # type: ignore[attr-defined]


def test_bad_suite_lists_every_problem_at_once(tmp_path: Path) -> None:
    message, problems = _problems(tmp_path, BAD_SUITE)
    assert "\n" not in message and message.startswith(str(tmp_path / "suite.toml"))
    assert f"{len(problems)} problems" in message
    expected = [
        "defaults.options.temprature: unknown key 'temprature' (did you mean 'temperature'?)",
        "case #1 'one': checks[0].valu: unknown key 'valu' (did you mean 'value'?)",
        "case #2 'one': duplicate id, already used by case #1",
        "case #2 'one': checks[0].pattern: bad regex '(unclosed'",
        "case #3 'no-checks': checks: missing required key 'checks'",
        "case #4 'bad-turns': messages: the last message must be from 'user'",
        "case #4 'bad-turns': checks[0]: unknown check type 'contain' (did you mean 'contains'?)",
        "case #5 'empty': messages: no messages",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
        assert fragment in message


def test_unknown_top_level_and_case_keys(tmp_path: Path) -> None:
    text = 'judge_modle = "x"\n[[case]]\nid = "a"\ncategory = "factual"\nprompt = "x"\nheld-in = true\n' \
           '[[case.checks]]\ntype = "max_length"\n'
    _, problems = _problems(tmp_path, text)
    assert any("unknown key 'judge_modle' (did you mean 'judge_model'?)" in p for p in problems)
    assert any("unknown key 'held-in' (did you mean 'held_in'?)" in p for p in problems)
    assert any("max_length needs chars" in p for p in problems)


def test_toml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[[case]\nid = "x"', encoding="utf-8")
    with pytest.raises(UserInputError, match="not valid TOML"):
        load_suite(path)
    with pytest.raises(UserInputError, match="not found"):
        load_suite(tmp_path / "nope.toml")
    with pytest.raises(UserInputError, match="use a .toml or .jsonl"):
        (tmp_path / "s.yaml").write_text("x", encoding="utf-8")
        load_suite(tmp_path / "s.yaml")


def test_jsonl_suite_and_option_overrides(tmp_path: Path) -> None:
    cases = [
        {"id": "a", "category": "factual", "prompt": "Başkent?", "checks": [{"type": "contains", "value": "Ankara"}]},
        {"id": "b", "category": "format", "system": "Kısa yaz.", "prompt": "Say.", "options": {"num_predict": 8},
         "checks": [{"type": "max_length", "words": 3}]},
    ]
    path = tmp_path / "mini.jsonl"
    path.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n", encoding="utf-8")
    suite = load_suite(path)
    assert suite.name == "mini" and [c.id for c in suite.cases] == ["a", "b"]
    assert suite.cases[0].options.num_predict == 128
    assert suite.cases[1].options.num_predict == 8 and suite.cases[1].options.seed == 42
    assert [m.role for m in suite.cases[1].messages] == ["system", "user"]
    assert suite.cases[1].options.to_ollama() == {"temperature": 0.0, "seed": 42, "num_predict": 8}
    path.write_text('{"id": "a",\n', encoding="utf-8")
    _, problems = _problems(tmp_path, '{"id": "a",\n', name="mini.jsonl")
    assert any(p.startswith("line 1: not valid JSON") for p in problems)


def test_suite_defaults_merge_key_by_key(tmp_path: Path) -> None:
    text = """
[defaults.options]
num_predict = 64
temperature = 0.2
[[case]]
id = "a"
category = "factual"
prompt = "x"
options = { temperature = 0 }
[[case.checks]]
type = "turkish"
"""
    path = tmp_path / "s.toml"
    path.write_text(text, encoding="utf-8")
    opts = load_suite(path).cases[0].options
    assert (opts.temperature, opts.num_predict, opts.seed) == (0, 64, 42)


def test_a_sample_keeps_every_group_in_proportion_and_is_reproducible(suite: Suite) -> None:
    from collections import Counter

    whole = Counter((c.category, c.held_in) for c in suite.cases)
    sample = suite.sample(40)
    picked = Counter((c.category, c.held_in) for c in sample.cases)
    assert len(sample.cases) == 40 and len({c.id for c in sample.cases}) == 40
    assert set(picked) == set(whole)   # every category, held-in and held-out, is still measured
    for group, n in whole.items():
        assert abs(picked[group] - 40 * n / len(suite.cases)) <= 1, group
    assert [c.id for c in sample.cases] == [c.id for c in suite.sample(40).cases]
    assert [c.id for c in sample.cases] != [c.id for c in suite.sample(40, seed=7).cases]
    order = [c.id for c in suite.cases]
    assert [c.id for c in sample.cases] == sorted((c.id for c in sample.cases), key=order.index)
    assert "seeded sample of 40 of 104 cases" in sample.name
    assert len(suite.sample(5).cases) == 5 and suite.sample(500) is suite


def test_a_sample_reaches_the_recipe_and_the_eval_command(tmp_path) -> None:
    from click.testing import CliRunner

    from ollama_ft.cli import main
    from ollama_ft.recipe import load_recipe

    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nbase = "tiny:llama"\n[data]\ntrain = "d.jsonl"\n[ollama]\nname = "x"\n'
                      '[eval]\nsuite = "s.toml"\nsample = 0\n', encoding="utf-8")
    with pytest.raises(UserInputError, match="eval.sample"):
        load_recipe(recipe)
    result = CliRunner().invoke(main, ["eval", "m", "--sample", "0"])
    assert result.exit_code == 2 and "--sample" in result.output
