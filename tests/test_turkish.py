"""Turkish casefolding, diacritics and the offline language check (ollama_ft/turkish.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from ollama_ft.turkish import casefold_tr, is_turkish, nfc, normalise, strip_diacritics_tr, upper_tr

ROOT = Path(__file__).resolve().parent.parent
LABELLED = ROOT / "benchmarks" / "data" / "language_id.jsonl"


@pytest.mark.parametrize(
    ("upper", "lower"),
    [("İSTANBUL", "istanbul"), ("IĞDIR", "ığdır"), ("DİYARBAKIR", "diyarbakır"), ("ISPARTA", "ısparta"),
     ("ŞIRNAK", "şırnak"), ("ÇANAKKALE", "çanakkale"), ("GÜMÜŞHANE", "gümüşhane")],
)
def test_casefold_pairs(upper: str, lower: str) -> None:
    assert casefold_tr(upper) == lower
    assert normalise(upper) == normalise(lower)
    assert upper_tr(lower) == upper


def test_python_lower_pitfall_is_avoided() -> None:
    # Python's lower() turns İ into "i" + U+0307 (two code points) and I into plain i.
    assert "İ".lower() == "i\u0307"
    assert casefold_tr("İ") == "i"
    assert casefold_tr("I") == "ı"
    assert len(casefold_tr("İSTANBUL")) == len("istanbul")
    # Text already lowered the wrong way still compares equal.
    assert casefold_tr("İSTANBUL".lower()) == "istanbul"


def test_dotted_and_dotless_stay_different_without_diacritics_option() -> None:
    assert normalise("ISTANBUL") != normalise("istanbul")  # English capitals: "ıstanbul"
    assert normalise("kır") != normalise("kir")
    assert normalise("IĞDIR") != normalise("igdir")


def test_diacritics_option_folds_them() -> None:
    assert strip_diacritics_tr("çğıöşü ÇĞİÖŞÜ") == "cgiosu CGIOSU"
    assert normalise("IĞDIR", diacritics=True) == "igdir"
    assert normalise("Igdir", diacritics=True) == "igdir"
    assert normalise("ISTANBUL", diacritics=True) == normalise("İstanbul", diacritics=True) == "istanbul"
    assert normalise("Şanlıurfa", diacritics=True) == "sanliurfa"
    assert normalise("kâğıt", diacritics=True) == "kagit"


def test_decomposed_letters_equal_composed() -> None:
    decomposed = "s\u0327ehir g\u0306u\u0308zel I\u0307zmir"  # ş, ğ, ü, İ built from combining marks
    assert decomposed != "şehir ğüzel İzmir"
    assert unicodedata.normalize("NFD", "Şanlıurfa") != "Şanlıurfa"
    assert nfc(decomposed) == "şehir ğüzel İzmir"
    assert normalise(decomposed) == "şehir ğüzel izmir"
    assert normalise(unicodedata.normalize("NFD", "ÇORUM")) == "çorum"


def test_whitespace_and_punctuation_folding() -> None:
    assert normalise("  Ankara’dır\n\t ve\u00a0“İzmir”…  ") == "ankara'dır ve \"izmir\"..."
    assert normalise("1915–1916") == "1915-1916"


# --- the language check (py3langid; chosen in benchmarks/results/2026-11-26-language-id) ------


@pytest.mark.parametrize(
    "text",
    [
        "Türkiye'nin başkenti Ankara'dır.",
        "Kediler pencerenin önünde uyuyor.",
        "Bu kitap ne kadar?",  # no Turkish letters at all
        "Ali okula gitti ve kitap aldi.",
        "Yarin sabah okula gidecegim ama once kahvalti yapacagim.",  # Turkish typed on an English keyboard
        "Toplantı yarın saat 10.00'da büyük salonda.",
        "TÜRKİYE'NİN BAŞKENTİ ANKARA'DIR.",  # all capitals, lowered the Turkish way
        "Türk kahvesi cezvede pişirilir.",
    ],
)
def test_turkish_text_is_turkish(text: str) -> None:
    ok, score = is_turkish(text)
    assert ok, (text, score)
    assert score >= 0.5


@pytest.mark.parametrize(
    "text",
    [
        "Die Hauptstadt der Türkei ist Ankara.",  # the word list called this Turkish
        "Ich lerne seit zwei Jahren Türkisch.",
        "Azərbaycanın paytaxtı Bakıdır.",  # the nearest language
        "Bu sualın cavabını bilmirəm.",
        "The capital of Turkey is Ankara.",
        "Where is the train station?",
        "I love Istanbul.",
        "I LOVE ISTANBUL.",  # English capitals are not lowered the Turkish way ("ı love")
        "Thank you very much.",
        "It is raining in Istanbul today and the streets are wet.",
    ],
)
def test_other_languages_are_not_turkish(text: str) -> None:
    ok, score = is_turkish(text)
    assert not ok, (text, score)
    assert score < 0.5


def test_mixed_text_follows_the_language_that_carries_it() -> None:
    assert not is_turkish("Merhaba, how are you doing today?")[0]
    assert is_turkish("Bugün çok yorgunum ve biraz uyumak istiyorum, really.")[0]
    assert not is_turkish("This is the answer: Ankara'dır.")[0]
    assert is_turkish("Bence bu approach daha iyi, çünkü daha az memory kullanıyor.")[0]


def test_texts_without_letters() -> None:
    assert is_turkish("") == (False, 0.0)
    assert is_turkish("42") == (False, 0.0)
    assert is_turkish(" ... !? ") == (False, 0.0)


def test_accuracy_on_the_labelled_set() -> None:
    """The figures committed with the choice still hold for the pinned version (at most 8 of 168 wrong)."""
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    wrong = []
    for row in rows:
        verdict, score = is_turkish(row["text"])
        assert verdict == (score >= 0.5), row  # the verdict is the score's side of 0.5
        if verdict != (row["lang"] == "tr"):
            wrong.append(row["text"])
    assert len(rows) == 168
    assert len(wrong) <= 8, wrong
    by_group = {g: sum(r["group"] == g and r["text"] in wrong for r in rows) for g in ("az", "de", "en")}
    assert by_group == {"az": 0, "de": 0, "en": 0}  # no other language passes for Turkish


def test_the_library_is_imported_only_when_a_text_is_checked() -> None:
    code = ("import sys, ollama_ft.eval_checks, ollama_ft.turkish as t; a = 'py3langid' in sys.modules; "
            "t.is_turkish('Merhaba dünya'); print(a, 'py3langid' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "True"]
