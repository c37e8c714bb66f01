"""Turkish casefolding, diacritics and the offline language check (ollama_ft/turkish.py)."""

from __future__ import annotations

import unicodedata

import pytest

from ollama_ft.turkish import casefold_tr, is_turkish, nfc, normalise, strip_diacritics_tr, upper_tr


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


@pytest.mark.parametrize(
    "text",
    [
        "Türkiye'nin başkenti Ankara'dır.",
        "Kediler pencerenin önünde uyuyor.",
        "Bu kitap ne kadar?",  # no Turkish letters at all
        "Ali okula gitti ve kitap aldi.",
        "Yarin sabah okula gidecegim ama once kahvalti yapacagim.",  # Turkish typed on an English keyboard
        "Evet.",
        "Toplantı yarın saat 10.00'da büyük salonda.",
    ],
)
def test_turkish_text_is_turkish(text: str) -> None:
    ok, score = is_turkish(text)
    assert ok, (text, score)
    assert score >= 0.5


@pytest.mark.parametrize(
    "text",
    [
        "The capital of Turkey is Ankara.",
        "Where is the train station?",
        "I love Istanbul.",
        "Thank you very much.",
        "It is raining in Istanbul today and the streets are wet.",
        "Yes.",
    ],
)
def test_english_text_is_not_turkish(text: str) -> None:
    ok, score = is_turkish(text)
    assert not ok, (text, score)
    assert score < 0.5


def test_mixed_text_follows_the_majority() -> None:
    assert not is_turkish("Merhaba, how are you doing today?")[0]
    assert is_turkish("Bugün çok yorgunum ve biraz uyumak istiyorum, really.")[0]
    english, _ = is_turkish("This is the answer: Ankara'dır.")
    assert not english


def test_short_and_empty_texts() -> None:
    assert is_turkish("") == (False, 0.0)
    assert is_turkish("42") == (False, 0.0)
    # A bare name gives no evidence either way: not called non-Turkish.
    assert is_turkish("Ankara.") == (True, 0.5)
    assert is_turkish("Iğdır")[0]
