"""`call` steps for the examples and the demo: each takes its upstream steps' outputs."""

from __future__ import annotations

from typing import Any


def count_words(inputs: dict[str, Any]) -> dict[str, int]:
    return {"words": len(["hello", "from", "runherd"])}


def report(inputs: dict[str, Any]) -> str:
    return f"counted {inputs['count']['words']} words"
