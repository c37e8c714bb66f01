"""Turkish-aware text normalisation and an offline "is this Turkish?" check.

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

# Frequent Turkish words without special letters, so plain-ASCII Turkish is still recognised.
_TR_WORDS = frozenset(
    """ve veya ile bir bu şu o da de ki mi mı mu mü ne için gibi kadar daha en çok az her hem
    ise ama fakat ancak yani değil var yok evet hayır lütfen merhaba teşekkür ederim tamam
    ben sen biz siz onlar bana sana beni seni bizi onu bunu şunu bunun onun olan olarak oldu
    olur nasıl neden niçin nerede nereye hangi hangisi kim kaç sonra önce şimdi bugün yarın dün
    iyi güzel büyük küçük yeni eski gün yıl il ilk son diye bile sadece yalnızca çünkü eğer""".split()
)
_EN_WORDS = frozenset(
    """the a an and or but of to in on at by for with from into about as is are was were be been
    being am do does did have has had not no yes this that these those it its he she they we you
    your my our their his her what which who whom where when why how there here can could will
    would should shall may might must i me him them us if then than so very just also only
    please thanks thank hello hi sorry okay""".split()
)
# Endings that are common in Turkish words and rare at the end of English ones.
_TR_SUFFIX = re.compile(
    r"(lar|ler|ları|leri|lık|lik|luk|lük|dır|dir|dur|dür|tır|tir|tur|tür|yor|yorum|yoruz|mış|miş|"
    r"muş|müş|acak|ecek|ında|inde|ından|inden|nın|nin|nun|nün|dı|dü|tı|tü|mak|mek|sın|sin|"
    r"ıyla|iyle|daki|deki|taki|teki|ması|mesi|dık|dik|tık|tik)$"
)
_EN_CUE = re.compile(r"(ing|tion|ly|ous|ness|ment|ght)$|th|wh|w|q|x|ee|oo")
_EN_CONTRACTION = re.compile(r"'(s|t|re|ll|ve|m|d)$")
_TR_ONLY_LETTERS = set("çğıöşüÇĞİÖŞÜ")
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _word_votes(token: str) -> tuple[int, int]:
    """(Turkish, English) evidence for one word: each is 0 or 1."""
    en_low = token.lower()
    tr_low = casefold_tr(token)
    tr = bool(
        _TR_ONLY_LETTERS.intersection(token)
        or tr_low in _TR_WORDS
        or ("'" in tr_low and not _EN_CONTRACTION.search(en_low))
        or (len(tr_low) > 4 and _TR_SUFFIX.search(tr_low) and not _EN_CUE.search(en_low))
    )
    en = not tr and bool(
        en_low in _EN_WORDS or _EN_CONTRACTION.search(en_low) or _EN_CUE.search(en_low)
    )
    return int(tr), int(en)


def is_turkish(text: str) -> tuple[bool, float]:
    """Guess whether `text` is Turkish, offline. Returns (verdict, score in [0, 1]).

    Each word votes Turkish (Turkish-only letters, a common Turkish word, a Turkish ending,
    an apostrophe suffix such as "Ankara'dır") or English (common English word, English
    ending or letter pattern); the score is (tr + 0.5) / (tr + en + 1), so one word counts
    for little and a text with no evidence either way (a bare name: "Ankara.") scores 0.5.
    The verdict is score >= 0.5. A text with no letters at all is (False, 0.0).
    """
    tokens = _TOKEN.findall(fold_punctuation(nfc(text)))
    if not tokens:
        return False, 0.0
    tr = en = 0
    for token in tokens:
        t, e = _word_votes(token)
        tr += t
        en += e
    score = (tr + 0.5) / (tr + en + 1)
    return score >= 0.5, round(score, 3)
