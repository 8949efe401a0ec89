"""How often the math checkers agree with Math-Verify's own test suite (experiments/math_verify_cases.jsonl:
a gold answer, a prediction, and whether they match). Each case is scored as the trainer scores a
completion against a data set's answer field, reward(prediction, gold), by `--checker math` and, when the
math_verify package is installed, by `--checker math_verify`.

    python experiments/checker_agreement.py [--show]

A false accept rewards a wrong answer (a reward hack); a false reject withholds the reward from a right one.
--show lists every disagreement.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from offpolicy_pessimism import math_reward, math_verify_reward  # noqa: E402

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_verify_cases.jsonl")


def read_cases(path: str = CASES) -> list[dict]:
    """The cases, without the header line that names their source."""
    with open(path, encoding="utf-8") as f:
        return [case for case in map(json.loads, f) if "gold" in case]


def tally(checker, cases: list[dict], show: bool = False) -> dict:
    """agree / false accept / false reject of checker(prediction, gold) against the expected verdicts."""
    counts = {"agree": 0, "false accept": 0, "false reject": 0}
    for case in cases:
        accepted = checker(case["prediction"], case["gold"]) == 1.0
        verdict = "agree" if accepted == case["match"] else "false accept" if accepted else "false reject"
        counts[verdict] += 1
        if show and verdict != "agree":
            print(f"  {verdict}: {case['source']}: gold {case['gold'][-60:]!r}, "
                  f"prediction {case['prediction'][-60:]!r}")
    return counts


def main() -> None:
    cases = read_cases()
    checkers = {"math": math_reward}
    try:
        import math_verify  # noqa: F401
        checkers["math_verify"] = math_verify_reward
    except ImportError:
        print("math_verify is not installed: --checker math only")
    rows = {name: tally(checker, cases, show="--show" in sys.argv) for name, checker in checkers.items()}
    print(f"{len(cases)} cases ({sum(case['match'] for case in cases)} match, "
          f"{sum(not case['match'] for case in cases)} do not)\n")
    print("| --checker   | agree | false accept | false reject |\n|---|---|---|---|")
    for name, counts in rows.items():
        print(f"| {name:<11} | {counts['agree']:>5} | {counts['false accept']:>12} | {counts['false reject']:>12} |")


if __name__ == "__main__":
    main()
