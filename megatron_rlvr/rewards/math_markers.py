"""The parts of a MATH answer that change its value but that the equivalence checks drop: the base subscript of a
base-n numeral (`4210_{5}` is not `4210_{7}`) and a unit (`5\\text{ cm}` is not `5\\text{ m}`).

math-verify and the sympy comparison read `4210_{5}` and `4210_{7}` as the same symbol-with-subscript or number,
and the normalization removes units so that `5\\text{ cm}` matches a bare `5`. So before those checks,
`markers_conflict` rejects a pair in which both answers state a base, or both state a recognised unit, and the two
differ. An answer that leaves the marker out is still compared by value (`4210` for `4210_{5}`, `5` for
`5\\text{ cm}`): the problem asked for that base or unit and the number is written in it. Units are recognised
from a table of common length, area, volume, time, mass and money units (singular, plural and abbreviated
spellings, `square`/`cubic` and `^2`/`^3` powers); a word that is not a unit ("ways", "apples") is no marker.
"""

from __future__ import annotations

import re

_BASE_NUMERAL = re.compile(r"^\{?([0-9A-Za-z]+)\}?_\{?\s*(\d+)\s*\}?$")
_TEXT_UNIT = re.compile(
    r"\\(?:text|textrm|mbox|mathrm|operatorname)\s*\{\s*([A-Za-z][A-Za-z\s.]*?)\s*\}(?:\s*\^\s*\{?\s*(\d)\s*\}?)?"
)

_UNIT_SPELLINGS = {
    "mm": "mm millimeter millimetre", "cm": "cm centimeter centimetre", "m": "m meter metre",
    "km": "km kilometer kilometre", "in": "in inch", "ft": "ft foot feet", "yd": "yd yard", "mi": "mi mile",
    "s": "s sec second", "min": "min minute", "h": "h hr hour", "day": "day", "week": "week", "month": "month",
    "year": "yr year", "mg": "mg milligram", "g": "g gram", "kg": "kg kilogram", "lb": "lb lbs pound",
    "oz": "oz ounce", "ml": "ml milliliter millilitre", "l": "l liter litre", "gal": "gal gallon",
    "cent": "cent cents", "dollar": "dollar", "mph": "mph", "unit": "unit",
}
_UNITS = {spelling: unit for unit, spellings in _UNIT_SPELLINGS.items() for spelling in spellings.split()}
_POWER_WORDS = {"square": 2, "sq": 2, "cubic": 3, "cu": 3}


def base_of(answer: str) -> str | None:
    """The base written as a subscript of a numeral (`"5"` for `4210_{5}`), or None."""
    match = _BASE_NUMERAL.match(answer.strip().rstrip("."))
    return match[2] if match else None


def _unit_name(word: str) -> str | None:
    word = word.lower().rstrip(".")
    for candidate in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None):
        if candidate in _UNITS:
            return _UNITS[candidate]
    return None


def unit_of(answer: str) -> tuple[str, int] | None:
    """(unit, power) of the last `\\text{...}` unit in the answer (`("cm", 2)` for `12\\text{ cm}^2` or
    `12\\text{ square centimeters}`), or None when there is none or it is not a recognised unit."""
    last = None
    for last in _TEXT_UNIT.finditer(answer):
        pass
    if last is None:
        return None
    words = last[1].split()
    power = int(last[2]) if last[2] else 1
    if len(words) == 2 and words[0].lower() in _POWER_WORDS:
        power *= _POWER_WORDS[words[0].lower()]
        words = words[1:]
    if len(words) != 1:
        return None
    unit = _unit_name(words[0])
    return (unit, power) if unit else None


def markers_conflict(answer: str, gold: str) -> bool:
    """Whether both answers state a base, or both a recognised unit, and these differ (module docstring)."""
    bases = base_of(answer), base_of(gold)
    if None not in bases and bases[0] != bases[1]:
        return True
    units = unit_of(answer), unit_of(gold)
    return None not in units and units[0] != units[1]
