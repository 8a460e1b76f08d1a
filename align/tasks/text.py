"""Small text parsers shared by the gold scorers: words, sentences, numbers, JSON objects, lists.

Each parser is forgiving about the wrapping a chat model puts around an answer ("The answer is 85.",
a ```json fence) and strict about the answer itself, so a score measures the skill, not the phrasing.
"""

import json
import re

# A word is a run of letters/digits, with inner apostrophes or hyphens kept ("don't", "well-known" count once).
_WORD = re.compile(r"[^\W_]+(?:['\u2019-][^\W_]+)*")

# Numbers: "1,234" (thousands groups) before plain digits, so "1,234" is one number and "3, 4" is two.
# The lookbehind stops "37-48" reading as 37 and -48: a sign only counts after a non-word character.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

# Abbreviations whose periods do not end a sentence; matched case-insensitively at a word start.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "approx.", "a.m.", "p.m.", "u.s.")
_ABBREVIATION = re.compile(
    r"(?<!\w)(" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")", flags=re.IGNORECASE
)

# A sentence ends at . ! ? (repeated, possibly followed by closing quotes/brackets) and then whitespace or the end;
# a line break also ends one, so a bulleted list counts as several sentences.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?:\s+|$)|\n+")

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", flags=re.DOTALL | re.IGNORECASE)
_LIST = re.compile(r"\[([^\[\]]*)\]")
_INTEGER = re.compile(r"[+-]?\d+")


def normalize_quotes(text: str) -> str:
    """Curly quotes and the Unicode minus to ASCII, so "I can’t" and "I can't" match the same phrase."""
    return (
        text.replace("\u2019", "'")
        .replace("\u2018", "'")
        .replace("\u201c", '"')
        .replace("\u201d", '"')
        .replace("\u2212", "-")
    )


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`; text without final punctuation still counts as a sentence."""
    # Drop the periods of known abbreviations first, so "e.g. apples" does not end a sentence.
    masked = _ABBREVIATION.sub(lambda m: m.group(1).replace(".", ""), text)
    parts = _SENTENCE_END.split(masked)
    return [p.strip() for p in parts if re.search(r"[^\W_]", p)]


def final_number(text: str) -> float | None:
    """The last number in `text` ("37 + 48 = 85" -> 85.0), or None if it has none."""
    matches = _NUMBER.findall(normalize_quotes(text))
    if not matches:
        return None
    return float(matches[-1].replace(",", ""))


def contains_word(text: str, word: str) -> bool:
    """Whole-word, case-insensitive match: "cat" is in "A cat sat." but not in "category"."""
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def mentions_any(text: str, stems: list[str]) -> bool:
    """Whether any stem starts a word of `text` ("orbit" matches "orbits"), case-insensitively."""
    text = normalize_quotes(text)
    return any(re.search(r"(?<!\w)" + re.escape(stem), text, flags=re.IGNORECASE) for stem in stems)


def extract_json_object(text: str) -> dict | None:
    """The first JSON object in `text`: inside a ```json fence if there is one, else the first parsable {...}."""
    fence = _FENCE.search(text)
    candidates = [fence.group(1), text] if fence else [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        start = candidate.find("{")
        while start != -1:
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except (ValueError, RecursionError):
                value = None
            if isinstance(value, dict):
                return value
            start = candidate.find("{", start + 1)
    return None


def extract_list(text: str) -> list[str] | None:
    """Items of the first [...] in `text` as normalised strings, or None without one.

    Quotes are stripped so `["b", "a"]` and `[b, a]` agree; integers are canonicalised ("07" -> "7").
    """
    match = _LIST.search(normalize_quotes(text))
    if match is None:
        return None
    items = [item.strip().strip("\"'`").strip() for item in match.group(1).split(",")]
    return [normalize_item(item) for item in items if item]


def normalize_item(item: object) -> str:
    """The comparison form of a list item: integers as canonical digits, words lower-cased."""
    text = str(item).strip()
    if _INTEGER.fullmatch(text):
        return str(int(text))
    return text.casefold()
