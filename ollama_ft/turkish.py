"""Turkish-aware text normalisation and an offline "is this Turkish?" check (py3langid).

Every text check in the eval suite compares through `normalise`, so "İSTANBUL" matches
"istanbul" and "IĞDIR" matches "ığdır". Python's own `str.lower()` is wrong for Turkish:
it maps "I" to "i" (should be "ı") and "İ" to "i" + U+0307 (a stray combining dot).

    >>> normalise("  İSTANBUL’da\u00a0 ")
    "istanbul'da"
    >>> normalise("IĞDIR", diacritics=True)
    'igdir'
    >>> is_turkish("Bu kitap ne kadar?")[0]
    True
"""

from __future__ import annotations

import re
import threading
import unicodedata

__all__ = [
    "nfc",
    "casefold_tr",
    "upper_tr",
    "strip_diacritics_tr",
    "fold_punctuation",
    "fold_whitespace",
    "normalise",
    "is_turkish",
]

_DIACRITICS = str.maketrans(
    {
        "ç": "c", "ğ": "g", "ı": "i", "ö": "o", "ş": "s", "ü": "u",
        "Ç": "C", "Ğ": "G", "İ": "I", "Ö": "O", "Ş": "S", "Ü": "U",
        # Circumflexes still appear in Turkish (kâğıt, hâlâ, Hakkâri).
        "â": "a", "î": "i", "û": "u", "Â": "A", "Î": "I", "Û": "U",
    }
)

# Typographic variants a model may emit for the same punctuation mark.
_PUNCTUATION = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u02bc": "'", "\u2032": "'", "`": "'",
        "\u00b4": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2212": "-",
        "\u2026": "...",
    }
)
_WHITESPACE = re.compile(r"\s+")


def nfc(s: str) -> str:
    """Compose decomposed letters ("s" + U+0327 becomes "ş") so equal text compares equal."""
    return unicodedata.normalize("NFC", s)


def casefold_tr(s: str) -> str:
    """Lower-case with Turkish rules: "İ" -> "i", "I" -> "ı", then the usual lower()."""
    s = nfc(s).replace("İ", "i").replace("I", "ı").lower()
    # Text lowered elsewhere with Python's default rules carries "i" + combining dot.
    return s.replace("i\u0307", "i")


def upper_tr(s: str) -> str:
    """Upper-case with Turkish rules: "i" -> "İ", "ı" -> "I", then the usual upper()."""
    return nfc(s).replace("i", "İ").replace("ı", "I").upper()


def strip_diacritics_tr(s: str) -> str:
    """Replace Turkish letters by their plain Latin base (ç->c, ğ->g, ı->i, ö->o, ş->s, ü->u).

    Separate from casefolding on purpose: "kır" (countryside) and "kir" (dirt) are different
    words, so a check only ignores diacritics when its author asks for it.
    """
    return nfc(s).translate(_DIACRITICS)


def fold_punctuation(s: str) -> str:
    """Map curly quotes, Turkish-style apostrophes, dashes and ellipses to their ASCII forms."""
    return s.translate(_PUNCTUATION)


def fold_whitespace(s: str) -> str:
    """Collapse runs of whitespace (newlines, tabs, no-break spaces) to one space and trim."""
    return _WHITESPACE.sub(" ", s).strip()


def normalise(s: str, *, diacritics: bool = False) -> str:
    """NFC, punctuation and whitespace folding and Turkish casefolding, in that order.

    diacritics=True also strips Turkish diacritics, so "Iğdır", "IGDIR" and "igdir" all
    become "igdir". With the default (False) they stay: "ığdır" and "igdir" differ.
    """
    out = casefold_tr(fold_whitespace(fold_punctuation(nfc(s))))
    return strip_diacritics_tr(out) if diacritics else out


# --- language check -----------------------------------------------------------------------

# py3langid (a maintained fork of langid.py, 4.4 MB with its model, numpy only) was chosen by
# measurement on benchmarks/data/language_id.jsonl: see benchmarks/results/2026-11-26-language-id/.
_LETTER = re.compile(r"[^\W\d_]")
_identifier = None
_identifier_lock = threading.Lock()


def _language_identifier():
    """py3langid's identifier with probabilities, loaded once (about 2 s) on first use."""
    global _identifier
    with _identifier_lock:  # the eval runs cases in threads; load the model once
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier  # imported here: keeps --help fast

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def is_turkish(text: str) -> tuple[bool, float]:
    """Guess whether `text` is Turkish, offline. Returns (verdict, score in [0, 1]).

    py3langid ranks its 140 languages; the score is Turkish's share of Turkish plus the most
    likely other language, so the verdict, score >= 0.5, means Turkish is ranked first, and a
    reply Turkish only by a hair scores near 0.5. A text with no letters is (False, 0.0).
    One-word replies ("Evet.") are beyond every library measured: judge sentences.
    """
    text = fold_punctuation(nfc(text))
    if not _LETTER.search(text):
        return False, 0.0
    if text.isupper() and "İ" in text:
        # py3langid lowers all-caps text with Python's rules ("İ" -> "i" + a combining dot). Only a
        # dotted capital says the text is Turkish-cased: lowering "I LOVE" the Turkish way makes it Turkish.
        text = casefold_tr(text)
    ranked = _language_identifier().rank(text)
    turkish = dict(ranked).get("tr", 0.0)
    other = next(p for lang, p in ranked if lang != "tr")
    score = round(turkish / (turkish + other), 3) if turkish + other > 0 else 0.0
    return score >= 0.5, score
