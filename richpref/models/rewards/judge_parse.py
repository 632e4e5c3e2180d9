"""Reading a score out of a generative judge's text answer.

Each reader follows what its reference accepts, with one difference: where the reference falls back
to a made-up value (UnifiedReward's callers score 0, EditScore scores the middle of its scale) or
takes an out-of-range number, these return None and the caller records the raw answer instead.

- `final_score`: UnifiedReward's pointwise answer ends with `Final Score: X`, X in 1..5 (one decimal
  part allowed); the first such match counts.
- `score_list`: EditScore / VIEScore answer a JSON-ish object `{"reasoning": ..., "score": [a, b]}`.
  The object between the first `{` and the last `}` is read as JSON, then with Python literals and
  single quotes mended, then with unescaped quotes inside `reasoning` escaped; failing that, every
  number after a `score` key (or in the whole answer when there is none) is taken.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

_FINAL = re.compile(r"Final Score:\s*([1-5](?:\.\d+)?)")
_NUMBER = re.compile(r"[-+]?\d*\.?\d+")


def final_score(text: str | None) -> float | None:
    """The `Final Score:` value (1..5), or None when the answer holds none."""
    m = _FINAL.search(text or "")
    return float(m.group(1)) if m else None


def _scores_of(data: Any) -> list[float] | None:
    """The `score` list of a parsed object (None when it is not an object with a reason or a score)."""
    if not isinstance(data, dict):
        return None
    raw = data.get("score")
    if isinstance(raw, bool):
        raw = None
    if isinstance(raw, (int, float)):
        scores = [float(raw)]
    elif isinstance(raw, list):
        scores = []
        for v in raw:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                continue
            try:
                scores.append(float(v))
            except ValueError:
                return None
    else:
        scores = []
    has_reason = any(isinstance(data.get(k), str) and data.get(k) for k in ("reasoning", "reason", "rationale"))
    return scores if (scores or has_reason) else None


def _python_literals(s: str) -> str:
    s = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", s)))
    swapped = s.replace("'", '"')
    try:
        json.loads(swapped)
        return swapped
    except json.JSONDecodeError:
        return re.sub(r"([\{\s,])(\w+)\s*:", r'\1"\2":', s)  # bare keys get quotes


def _escape_reasoning(s: str) -> str:
    def esc(m: re.Match) -> str:
        return m.group(1) + m.group(2).replace('"', '\\"')

    return re.sub(r'("reasoning"\s*:\s*")(.*?)(?="\s*[,}])', esc, s, flags=re.S)


def score_list(text: str | None) -> list[float]:
    """Every score the answer gives, in order (empty when it gives none)."""
    if not text or not text.strip():
        return []
    m = re.search(r"\{.*\}", text, flags=re.S)
    body = m.group(0) if m else text.strip()
    for mend in (lambda s: s, _python_literals, _escape_reasoning):
        try:
            scores = _scores_of(json.loads(mend(body)))
        except (json.JSONDecodeError, TypeError, ValueError):
            continue
        if scores is not None:
            return scores
    key = re.search(r"[\"']score[\"']\s*:\s*(.*)", body, flags=re.S | re.I)
    return [float(x) for x in _NUMBER.findall(key.group(1) if key else body)]


def edit_score(edit_answer: str | None, quality_answer: str | None, scale: int) -> dict[str, float]:
    """EditScore's scores from its two answers, on 0..10 whatever the asked `scale`.

    semantics (SC) = min of the edit answer's scores, quality (PQ) = min of the quality answer's,
    overall = sqrt(SC * PQ); each divided by scale / 10. A missing or out-of-range score is NaN (the
    reference substitutes scale / 2), and so is `overall` then."""
    out = {}
    for name, answer in (("semantics", edit_answer), ("quality", quality_answer)):
        scores = score_list(answer)
        value = min(scores) / (scale / 10) if scores else math.nan
        out[name] = value if 0 <= value <= 10 else math.nan
    out["overall"] = math.sqrt(out["semantics"] * out["quality"])  # NaN stays NaN
    return out


__all__ = ["edit_score", "final_score", "score_list"]
