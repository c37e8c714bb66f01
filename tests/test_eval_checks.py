"""Every check type of the eval suite, passing and failing, without a server (ollama_ft/eval_checks.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from ollama_ft.eval_checks import extract_numbers, parse_verdict, run_check
from ollama_ft.eval_suite import Check, JudgeCheck

_CHECK = TypeAdapter(Check)


def check(**fields: Any) -> Any:
    return _CHECK.validate_python(fields)


def passes(c: Any, reply: str, **kw: Any) -> bool:
    return run_check(c, reply, **kw).passed


def test_contains_uses_turkish_casefolding() -> None:
    c = check(type="contains", value="İstanbul")
    assert passes(c, "Türkiye'nin en kalabalık şehri İSTANBUL'dur.")
    assert passes(c, "istanbul")
    assert not passes(c, "ISTANBUL")  # English capitals lower to "ıstanbul"
    assert not passes(c, "Ankara")
    assert "missing" in run_check(c, "Ankara").detail


def test_contains_diacritics_insensitive() -> None:
    strict = check(type="contains", value="Iğdır")
    loose = check(type="contains", value="Iğdır", diacritics_insensitive=True)
    assert passes(strict, "IĞDIR") and passes(strict, "ığdır")
    assert not passes(strict, "Igdir")
    assert passes(loose, "Igdir") and passes(loose, "IGDIR")


def test_contains_nfc_and_curly_apostrophe() -> None:
    c = check(type="contains", value="Ankara'dır")
    assert passes(c, "Başkent Ankara’dır.")
    assert passes(check(type="contains", value="şehir"), "s\u0327ehir")


def test_contains_any_and_all() -> None:
    any_ = check(type="contains_any", values=["Fatih", "II. Mehmet"])
    assert passes(any_, "II. MEHMET fethetti.")
    assert not passes(any_, "Kanuni fethetti.")
    all_ = check(type="contains_all", values=["yalnız", "herkes"])
    assert passes(all_, "Yalnız kalmak istiyorum, HERKES gitsin.")
    result = run_check(all_, "Yalnız kalmak istiyorum, herkez gitsin.")
    assert not result.passed and "herkes" in result.detail


def test_not_contains() -> None:
    c = check(type="not_contains", value="yardımcı olamam")
    assert passes(c, "Soğanı ince ince doğrayın.")
    assert not passes(c, "Bu konuda YARDIMCI OLAMAM.")


def test_exact_ignores_case_and_outer_punctuation() -> None:
    c = check(type="exact", value="Tamam")
    assert passes(c, "  TAMAM. ")
    assert passes(c, "“Tamam!”")
    assert not passes(c, "Tamam, hemen yazıyorum.")


def test_regex_casefolded_and_case_sensitive() -> None:
    assert passes(check(type="regex", pattern=r"\bankara\b"), "ANKARA başkenttir.")
    sensitive = check(type="regex", pattern="İZMİR", case_sensitive=True)
    assert passes(sensitive, "İZMİR")
    assert not passes(sensitive, "IZMIR")
    lower = check(type="regex", pattern="ısparta", case_sensitive=True)
    assert passes(lower, "ısparta") and not passes(lower, "isparta")
    listing = check(type="regex", pattern=r"(?m)^\s*(?:[-*•]|\d+[.)])\s*\S")
    assert passes(listing, "Mevsimler:\n- ilkbahar\n- yaz")
    assert not passes(listing, "ilkbahar, yaz, sonbahar, kış")
    assert passes(check(type="regex", pattern="igdir", diacritics_insensitive=True), "Iğdır")


@pytest.mark.parametrize(
    ("text", "numbers"),
    [
        ("2,5 ile 4,25'in toplamı 6,75'tir.", [2.5, 4.25, 6.75]),
        ("Yüzölçümü 783.562 km², nüfusu 85.000.000.", [783562.0, 85000000.0]),
        ("1.234,5 TL", [1234.5]),
        ("3.5 kg", [3.5]),
        ("Ankara'nın plaka kodu 06'dır.", [6.0]),
        ("Sıcaklık -5 derece, 1915-1916 yılları.", [-5.0, 1915.0, 1916.0]),
        ("Sayı yok.", []),
    ],
)
def test_extract_numbers_turkish_formats(text: str, numbers: list[float]) -> None:
    assert extract_numbers(text) == numbers


def test_number_with_decimal_comma_and_tolerance() -> None:
    exact = check(type="number", value=6.75)
    assert passes(exact, "Sonuç 6,75'tir.")
    assert passes(exact, "Sonuç 6.75")
    assert not passes(exact, "Sonuç 6,7.")
    loose = check(type="number", value=6.75, tolerance=0.1)
    assert passes(loose, "Yaklaşık 6,7.")
    assert not passes(loose, "Yaklaşık 7.")
    assert not run_check(exact, "Bilmiyorum.").passed
    assert run_check(exact, "Bilmiyorum.").detail == "no number in the reply"


def test_number_match_first_or_last() -> None:
    reply = "12 ile 8'in toplamı 20'dir."
    assert passes(check(type="number", value=20), reply)  # match = "any"
    assert passes(check(type="number", value=20, match="last"), reply)
    assert not passes(check(type="number", value=20, match="first"), reply)


def test_json_with_required_keys() -> None:
    c = check(type="json", required_keys=["il", "plaka"])
    assert passes(c, '{"il": "İzmir", "plaka": 35}')
    assert passes(c, 'İşte:\n```json\n{"il": "İzmir", "plaka": 35}\n```')
    assert passes(c, 'Cevap: {"il": "İzmir", "plaka": 35} oldu.')
    missing = run_check(c, '{"il": "İzmir"}')
    assert not missing.passed and "plaka" in missing.detail
    assert not passes(c, '["İzmir", 35]')
    assert not passes(c, "il: İzmir, plaka: 35")
    assert not passes(c, '{"il": "İzmir", "plaka": 35')  # truncated


def test_json_keys_with_turkish_letters_and_whole_reply() -> None:
    c = check(type="json", required_keys=["bölge"])
    assert passes(c, '{"bo\u0308lge": "Ege"}')  # decomposed ö in the key
    whole = check(type="json", whole_reply=True)
    assert passes(whole, ' ["a", "b"] ')
    assert not passes(whole, 'Liste: ["a", "b"]')
    assert not passes(whole, '"just a string"')
    assert not passes(check(type="json"), "42")


def test_max_length_chars_and_words() -> None:
    words = check(type="max_length", words=3)
    assert passes(words, "Evet, öyle.")
    assert not passes(words, "Evet, kesinlikle öyle, İstanbul Türkiye'dedir.")
    chars = check(type="max_length", chars=5)
    assert passes(chars, "  56  ")
    assert not passes(chars, "Sonuç 56.")


def test_turkish_check_and_expect_false() -> None:
    assert passes(check(type="turkish"), "Türk kahvesi cezvede pişirilir.")
    assert not passes(check(type="turkish"), "Turkish coffee is brewed in a pot.")
    assert passes(check(type="turkish", expect=False), "Thank you.")
    assert not passes(check(type="turkish", expect=False), "Teşekkür ederim.")
    assert not passes(check(type="turkish", min_score=0.9), "Ankara.")


# --- judge --------------------------------------------------------------------------------

RUBRIC = check(type="judge", rubric="Yanıt kibar olmalı.")


def judge_says(raw: str):
    return lambda c, reply: raw


def test_judge_pass_and_fail() -> None:
    ok = run_check(RUBRIC, "Rica ederim.", judge=judge_says("Kibar bir yanıt.\nVERDICT: PASS"))
    assert ok.passed and not ok.error and ok.raw == "Kibar bir yanıt.\nVERDICT: PASS"
    bad = run_check(RUBRIC, "Git başımdan.", judge=judge_says("Kaba.\n  VERDICT: FAIL  \n"))
    assert not bad.passed and not bad.error


@pytest.mark.parametrize(
    "raw",
    [
        "",  # empty
        "VERDICT: PASS\nVERDICT: FAIL",  # both verdicts
        "VERDICT: PASS\nVERDICT: PASS",  # twice
        "verdict: pass",  # lowercase
        "Verdict: Pass",
        "VERDICT:PASS",
        "VERDICT: PAS",  # garbled
        "**VERDICT: PASS**",
        "VERDICT: PASS because the reply is polite",  # extra text on the line
        "The verdict is clear.\nVERDICT: PASS",  # another mention of the word
        "PASS",
    ],
)
def test_malformed_judge_replies_are_errors(raw: str) -> None:
    assert parse_verdict(raw) is None
    result = run_check(RUBRIC, "Rica ederim.", judge=judge_says(raw))
    assert not result.passed and result.error
    assert result.raw == raw  # kept for the report
    assert "judge error" in result.detail


def test_judge_missing_or_failing() -> None:
    assert run_check(RUBRIC, "x").error  # no judge injected

    def boom(c: JudgeCheck, reply: str) -> str:
        raise ConnectionError("judge server down")

    result = run_check(RUBRIC, "x", judge=boom)
    assert result.error and not result.passed and "judge server down" in result.detail


def test_judge_receives_check_and_reply() -> None:
    seen = {}

    def judge(c: JudgeCheck, reply: str) -> str:
        seen.update(rubric=c.rubric, reply=reply)
        return "VERDICT: PASS"

    assert run_check(RUBRIC, "Rica ederim.", judge=judge).passed
    assert seen == {"rubric": "Yanıt kibar olmalı.", "reply": "Rica ederim."}
