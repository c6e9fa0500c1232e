"""Run the fault tests N times in a row: `python tests/e2e/faults/repeat.py N` (`make faults`).

A fault test that passes once can still be flaky; this says how often each one passes. A run
passes when every fault test in it passed (a skip is not a pass). Each run's pytest output is
kept under .tenanttune/faults/; the last line reads "N passed, M failed" (runs), and the exit
status is 1 when any run failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def run_once(index: int, logs: Path, extra: list[str]) -> dict[str, str]:
    """One pytest run of the fault tests; each test's outcome (passed, failed, error, skipped)."""
    report = logs / f"run-{index}.xml"
    with (logs / f"run-{index}.log").open("wb") as log:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                str(HERE.relative_to(REPO)),
                "-p",
                "no:cacheprovider",
                "-o",
                "junit_family=xunit1",
                f"--junitxml={report}",
                *extra,
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if not report.exists():
        return {"(pytest did not report)": "error"}
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "?")
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        # A failing teardown adds a second entry for the same test: the worse one counts.
        if outcomes.get(name, "passed") == "passed":
            outcomes[name] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes or {"(no fault test collected)": "error"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", type=int, help="how many times to run the fault tests")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (e.g. -k worker)")
    args = parser.parse_args()
    logs = REPO / ".tenanttune" / "faults" / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{args.runs} runs of tests/e2e/faults; pytest output in {logs}", flush=True)
    passes: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    good = bad = 0
    for index in range(1, args.runs + 1):
        started = time.monotonic()
        outcomes = run_once(index, logs, args.pytest_args)
        took = time.monotonic() - started
        for name, outcome in outcomes.items():
            seen[name] += 1
            passes[name] += outcome == "passed"
        broken = {n: o for n, o in outcomes.items() if o != "passed"}
        if broken:
            bad += 1
            what = ", ".join(f"{n} {o}" for n, o in sorted(broken.items()))
            print(f"run {index}/{args.runs}: FAILED in {took:.0f} s: {what}", flush=True)
            print(f"    see {logs / f'run-{index}.log'}", flush=True)
        else:
            good += 1
            print(f"run {index}/{args.runs}: {len(outcomes)} passed in {took:.0f} s", flush=True)
    for name in sorted(seen):
        print(f"  {name}: {passes[name]}/{seen[name]} passed")
    print(f"{good} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
