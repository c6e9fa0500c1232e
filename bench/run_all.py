"""Every benchmark in one run: one summary table on stdout, the full report in BENCHMARKS.md.

`make bench` runs it. The stack benchmarks (overhead, start latency, status, the BullMQ peer)
share one private stack; the training-throughput and deployment benchmarks run processes of
their own. Sizes are chosen to keep the whole run under ~15 minutes on 2 cores; `--quick` is a
smoke run for development (its figures mean little).
Run: `python bench/run_all.py [--quick] [--render] [--out BENCHMARKS.md]`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import deploy_path
import job_latency
import peer_bullmq
import status_queries
import train_overhead
import train_throughput
from harness import BENCH_DIR, REPO, PrivateStack, Row, Section, machine, today

NOTES = Path(__file__).with_name("NOTES.md")
LAST_RUN = BENCH_DIR / "last-run.json"  # the sections of the last full run, for --render

FULL = {
    "throughput": {"runs": 3, "steps": 10},
    "overhead": {"runs": 2, "epochs": 36},
    "latency": {"jobs": 20},
    "status": {"seconds": 3.0, "levels": (1, 8, 32), "sizes": (100, 1000, 10000)},
    "peer": {"jobs": 20, "seconds": 3.0},
    "deploy": {"runs": 2},
}
QUICK = {
    "throughput": {"runs": 1, "steps": 2},
    "overhead": {"runs": 1, "epochs": 1},
    "latency": {"jobs": 3},
    "status": {"seconds": 0.5, "levels": (1, 8), "sizes": (100, 1000)},
    "peer": {"jobs": 3, "seconds": 0.5},
    "deploy": {"runs": 1},
}


def summary(sections: list[Section]) -> str:
    lines = [
        "| benchmark | measure | ours | compared with | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for s in sections:
        for r in s.rows:
            lines.append(
                f"| {s.title.split(':')[0]} | {r.what} | {r.ours} | {r.other or '–'} | "
                f"{r.ratio or '–'} | {r.target or '–'} |"
            )
    return "\n".join(lines)


def document(
    sections: list[Section], command: str, elapsed_s: float, machine_: str, date: str
) -> str:
    """BENCHMARKS.md: the summary, then each benchmark's command, details and notes."""
    notes = NOTES.read_text(encoding="utf-8") if NOTES.exists() else ""
    parts = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {date} in {elapsed_s / 60:.1f} min · machine: {machine_}.",
        "",
        "These machines are shared and noisy (others run tests on the same 2 cores): every "
        "comparison is two things measured in the same run, interleaved, and reported as a "
        "ratio of medians. Read the ratios, not the absolute seconds. No benchmark is a test; "
        "no test asserts a time.",
        "",
        "## Summary",
        "",
        summary(sections),
        "",
    ]
    for s in sections:
        parts += [f"## {s.title}", "", f"Command: `{s.command}`", "", s.body, ""]
    if notes:
        parts += [notes.rstrip(), ""]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument(
        "--render",
        action="store_true",
        help="rewrite the report from the last full run (e.g. after editing bench/NOTES.md)",
    )
    parser.add_argument(
        "--only",
        default="throughput,stack,deploy",
        help="comma-separated: throughput, stack (overhead, latency, status, peer), deploy",
    )
    args = parser.parse_args()
    if args.render:
        last = json.loads(LAST_RUN.read_text(encoding="utf-8"))
        sections_ = [
            Section(**{**s, "rows": [Row(**r) for r in s["rows"]]}) for s in last["sections"]
        ]
        args.out.write_text(
            document(sections_, last["command"], last["elapsed_s"], last["machine"], last["date"]),
            encoding="utf-8",
        )
        print(f"wrote {args.out} from {LAST_RUN}")
        return
    cfg = QUICK if args.quick else FULL
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    sections: list[Section] = []
    if "throughput" in only:
        print("== training throughput: ours vs HF Trainer", flush=True)
        sections.append(train_throughput.run(**cfg["throughput"]))  # type: ignore[arg-type]
    if "stack" in only:
        with PrivateStack() as st:
            print(f"== private stack up in {st.start_s:.1f} s", flush=True)
            print("== orchestration overhead", flush=True)
            overhead, _ = train_overhead.run(**cfg["overhead"], shared=st)  # type: ignore[arg-type]
            sections.append(overhead)
            print("== job start latency", flush=True)
            latency_section, latency = job_latency.run(**cfg["latency"], shared=st)  # type: ignore[arg-type]
            sections.append(latency_section)
            print("== status queries", flush=True)
            sections.append(status_queries.run(**cfg["status"], shared=st))  # type: ignore[arg-type]
            print("== BullMQ peer", flush=True)
            sections.append(
                peer_bullmq.run(**cfg["peer"], latency=latency, shared=st)  # type: ignore[arg-type]
            )
    if "deploy" in only:
        print("== deployment path", flush=True)
        sections.append(deploy_path.run(**cfg["deploy"]))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - t0
    command = "make bench" if not args.quick else "python bench/run_all.py --quick"
    print()
    print(summary(sections))
    if not args.quick or args.out != REPO / "BENCHMARKS.md":
        args.out.write_text(
            document(sections, command, elapsed, machine(), today()), encoding="utf-8"
        )
        print(f"\nwrote {args.out} ({elapsed / 60:.1f} min)")
    if not args.quick and only == {"throughput", "stack", "deploy"}:
        LAST_RUN.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": command,
            "elapsed_s": elapsed,
            "machine": machine(),
            "date": today(),
            "sections": [asdict(s) for s in sections],
        }
        LAST_RUN.write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
