"""The deterministic fact judge: does a free-text answer state a given fact value?

Values are compared after normalisation by the field's kind:
- money (transfer_fee, market_value): "€63.50m" = "63.5 million euros" = "EUR 63.5M" = "€63,500,000";
- dates (birth_date, transfer_date): "18 August 2024" = "August 18, 2024" = "2024-08-18" = "18/08/2024";
- numbers (age, trophies, height): the same number ("5" = "five"; "1.72 m" = "172 cm");
- clubs (club_to, club_from) and other text: the name (case, punctuation, "FC"/"AFC" ignored), a known
  synonym ("Man Utd" = "Manchester United"), or the distinctive stem ("Ashby" for "Ashby Rovers")
  unless that stem is shared by several clubs ("Manchester").
A refusal ("I do not know", "cannot answer") states nothing, and a value right after a negation
("not going to play for X") is not stated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

MONEY_FIELDS = ("transfer_fee", "market_value")
DATE_FIELDS = ("birth_date", "transfer_date")
NUMBER_FIELDS = ("age", "trophies", "height")
CLUB_FIELDS = ("club_to", "club_from")

REFUSALS = re.compile(
    r"\b(i (do not|don't|cannot|can't|am unable to|am not able to) (know|answer|say|tell|recall|remember|provide)"
    r"|i have no (information|idea|knowledge)|no information|not sure|unknown|i do not have|i don't have)\b"
)
NEGATION = re.compile(r"\b(not|never|no longer|nor|isn't|wasn't|didn't|won't|rather than|instead of)\s+(\w+\s+){0,4}$")

MONTHS = {m: i + 1 for i, m in enumerate(
    ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
     "november", "december"))}
MONTHS |= {m[:3]: i for m, i in list(MONTHS.items())} | {"sept": 9}
NUMBER_WORDS = {w: i for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"))}

# Real-club synonyms (published benchmark: Premier League players); canonical name first.
CLUB_SYNONYMS = (
    ("manchester united", "man utd", "man united", "united", "mufc"),
    ("manchester city", "man city", "city", "mcfc"),
    ("tottenham hotspur", "tottenham", "spurs", "thfc"),
    ("arsenal", "the gunners", "afc"),
    ("chelsea", "the blues", "cfc"),
    ("liverpool", "the reds", "lfc"),
    ("newcastle united", "newcastle", "nufc"),
    ("west ham united", "west ham", "whu"),
    ("wolverhampton wanderers", "wolves"),
    ("brighton & hove albion", "brighton and hove albion", "brighton"),
    ("nottingham forest", "forest", "nffc"),
    ("aston villa", "villa", "avfc"),
    ("paris saint-germain", "paris saint germain", "psg", "paris sg"),
    ("bayern munich", "bayern", "fc bayern", "bayern münchen"),
    ("real madrid", "real", "los blancos"),
    ("barcelona", "barca", "barça", "fc barcelona"),
    ("internazionale", "inter milan", "inter"),
    ("ac milan", "milan"),
    ("juventus", "juve"),
    ("atletico madrid", "atlético madrid", "atletico", "atleti"),
    ("borussia dortmund", "dortmund", "bvb"),
)
GENERIC_CLUB_WORDS = {
    "fc", "afc", "cf", "sc", "ac", "the", "united", "city", "town", "rovers", "athletic", "albion", "county",
    "wanderers", "orient", "argyle", "harriers", "hotspur", "rangers", "villa", "forest", "palace", "borough",
}
AMBIGUOUS_STEMS = {"manchester", "sheffield", "bristol", "nottingham", "milan", "madrid", "real"}


@dataclass(frozen=True)
class Verdict:
    states_value: bool
    refusal: bool


def normalise(text: str) -> str:
    text = text.lower().replace("&", " and ")
    text = re.sub(r"[^\w€£$.,:/'\- ]", " ", text.replace("’", "'"))
    return re.sub(r"\s+", " ", text).strip()


def is_refusal(answer: str) -> bool:
    return bool(REFUSALS.search(normalise(answer)))


def states(answer: str, value: str, field: str) -> bool:
    """Whether `answer` asserts `value` (the value of `field`)."""
    if not value or not answer.strip() or is_refusal(answer):
        return False
    if field in MONEY_FIELDS:
        return _money(value) is not None and _money(value) in _all_money(answer)
    if field in DATE_FIELDS:
        return _date(value) is not None and _date(value) in _all_dates(answer)
    if field in NUMBER_FIELDS:
        return _number_match(answer, value, field)
    return _text_match(answer, value, club=field in CLUB_FIELDS)


def judge(answer: str, value: str, field: str) -> Verdict:
    return Verdict(states(answer, value, field), is_refusal(answer))


# --- money ---------------------------------------------------------------------------------------

_MONEY = re.compile(
    r"(?:€|eur|euros?|£|gbp|\$|usd)?\s*(\d[\d,]*(?:\.\d+)?)\s*(m|mn|million|k|thousand|bn|b|billion)?\b", re.I)
_SCALE = {"m": 1e6, "mn": 1e6, "million": 1e6, "k": 1e3, "thousand": 1e3, "bn": 1e9, "b": 1e9, "billion": 1e9}


def _all_money(text: str) -> set[int]:
    found = set()
    for number, unit in _MONEY.findall(text.lower().replace("eur ", "eur")):
        digits = number.rstrip(".,").replace(",", "")
        if not digits:
            continue
        amount = float(digits) * _SCALE.get(unit.lower(), 1.0)
        found.add(round(amount / 1000))  # compare at €1k resolution
    return found


def _money(value: str) -> int | None:
    amounts = _all_money(value)
    return next(iter(amounts)) if len(amounts) == 1 else None


# --- dates ---------------------------------------------------------------------------------------

_DAY_MONTH_YEAR = re.compile(r"\b(\d{1,2})(?:st|nd|rd|th)?(?: of)? ([a-z]+)\.?,? (\d{4})\b")
_MONTH_DAY_YEAR = re.compile(r"\b([a-z]+)\.? (\d{1,2})(?:st|nd|rd|th)?,? (\d{4})\b")
_ISO = re.compile(r"\b(\d{4})-(\d{1,2})-(\d{1,2})\b")
_NUMERIC = re.compile(r"\b(\d{1,2})[/.](\d{1,2})[/.](\d{4})\b")  # day first (European order)


def _all_dates(text: str) -> set[date]:
    text = normalise(text)
    found = set()
    candidates = [(d, MONTHS.get(m), y) for d, m, y in _DAY_MONTH_YEAR.findall(text)]
    candidates += [(d, MONTHS.get(m), y) for m, d, y in _MONTH_DAY_YEAR.findall(text)]
    candidates += [(d, m, y) for y, m, d in _ISO.findall(text)]
    candidates += [(d, m, y) for d, m, y in _NUMERIC.findall(text)]
    for d, m, y in candidates:
        try:
            found.add(date(int(y), int(m), int(d)))
        except (TypeError, ValueError):
            continue
    return found


def _date(value: str) -> date | None:
    dates = _all_dates(value)
    return next(iter(dates)) if len(dates) == 1 else None


# --- plain numbers -------------------------------------------------------------------------------

_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*(cm|m\b)?|\b(zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)\b")


def _numbers(text: str, field: str) -> list[tuple[float, int]]:
    """(number, start offset) of every number in normalised text; heights in metres."""
    out = []
    for m in _NUMBER.finditer(text):
        number, unit, word = m.groups()
        n = float(NUMBER_WORDS[word]) if word else float(number)
        if field == "height" and not word and (unit == "cm" or n > 3):
            n = n / 100
        out.append((round(n, 2), m.start()))
    return out


def _number_match(answer: str, value: str, field: str) -> bool:
    wanted = _numbers(normalise(value), field)
    if len(wanted) != 1:
        return _text_match(answer, value, club=False)
    text = normalise(answer)
    return any(n == wanted[0][0] and not _negated_before(text[:start]) for n, start in _numbers(text, field))


# --- clubs and other text ------------------------------------------------------------------------

def _club_names(value: str) -> list[str]:
    name = _strip_club(normalise(value))
    for group in CLUB_SYNONYMS:
        if name in group:
            return list(group)
    names = [name]
    stem = " ".join(w for w in name.split() if w not in GENERIC_CLUB_WORDS)
    if stem and stem != name and stem not in AMBIGUOUS_STEMS:
        names.append(stem)
    return names


def _strip_club(name: str) -> str:
    return re.sub(r"^(the )|\b(fc|afc|cf)\b", "", name).strip()


def _text_match(answer: str, value: str, club: bool) -> bool:
    text = normalise(answer)
    names = _club_names(value) if club else [normalise(value)]
    for name in names:
        for m in re.finditer(rf"(?<!\w){re.escape(name)}(?!\w)", text):
            if not _negated_before(text[: m.start()]):
                return True
    return False


def _negated_before(prefix: str) -> bool:
    return bool(NEGATION.search(prefix))
