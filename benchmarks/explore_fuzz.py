"""Schema-driven fuzzing of the explore API, longer than the CI test, with several seeds.

    python benchmarks/explore_fuzz.py [--examples 200] [--seeds 3] [--first-seed 100]

Runs the two fuzz tests of tests/test_security_explore.py (Schemathesis on the app's own OpenAPI schema: its
examples, coverage and fuzzing phases, schema-valid and schema-invalid requests, on the app without a run and on
one with a freshly trained lenet5-modern run) under pytest, once per seed, with --examples generated cases per
operation on top of the examples and coverage cases. Every answer must be 2xx, or 4xx with exactly {"error": str};
never 5xx, never slower than 10 s. CI runs the same tests with seed 15 and 8 examples per operation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _common import machine_line, write_section

ROOT = Path(__file__).resolve().parent.parent
VERDICT = {True: "passed", False: "FAILED"}


def run_seed(seed: int, examples: int) -> tuple[bool, float, dict, str]:
    """One pytest run of the fuzz tests: (passed, seconds, report, last lines of output)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "CNNLAB_FUZZ_SEED": str(seed), "CNNLAB_FUZZ_EXAMPLES": str(examples),
               "CNNLAB_FUZZ_REPORT": str(report)}  # fmt: skip
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_security_explore.py",
               "-k", "fuzz"]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        data = json.loads(report.read_text()) if report.exists() else {"answers": [], "slowest": []}
    tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-15:])
    return out.returncode == 0, seconds, data, tail


def main() -> None:
    """Fuzz once per seed, print and write the RESULTS.md section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200, help="generated cases per operation and seed (200)")
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds, one pytest run each (3)")
    ap.add_argument("--first-seed", type=int, default=100, help="the first seed; then +1 (100)")
    args = ap.parse_args()
    import schemathesis

    answers: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    slowest: dict[tuple[str, str], float] = defaultdict(float)
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        ok, seconds, data, tail = run_seed(seed, args.examples)
        runs.append((seed, ok, seconds))
        print(f"seed {seed}: {VERDICT[ok]} in {seconds:.0f} s", flush=True)
        if not ok:
            print(tail)
        for a in data["answers"]:
            answers[(a["app"], a["operation"])][a["status"]] += a["count"]
        for s in data["slowest"]:
            key = (s["app"], s["operation"])
            slowest[key] = max(slowest[key], s["seconds"])
    total = sum(sum(v.values()) for v in answers.values())
    fivexx = sum(n for v in answers.values() for code, n in v.items() if code >= 500)
    rows = [
        f"| {app} | `{op}` | {sum(codes.values()):,} | "
        f"{', '.join(f'{code}: {n:,}' for code, n in sorted(codes.items()))} | {slowest[(app, op)] * 1000:.0f} |"
        for (app, op), codes in sorted(answers.items())
    ]
    body = "\n".join([
        f"Command: `python benchmarks/explore_fuzz.py --examples {args.examples} --seeds {args.seeds} "
        f"--first-seed {args.first_seed}`: the fuzz tests of tests/test_security_explore.py (Schemathesis "
        f"{schemathesis.__version__} on the app's own OpenAPI schema: examples, coverage and fuzzing phases, valid and "
        f"invalid requests) with {args.examples} generated cases per operation, once per seed, on the app without a "
        "run and on a lenet5-modern run. Every answer must be 2xx, or 4xx with exactly `{\"error\": str}`; never 5xx, "
        "never over 10 s.",
        "",
        f"Machine: {machine_line()}",
        "",
        f"Seeds: {', '.join(f'{seed} ({VERDICT[ok]}, {sec:.0f} s)' for seed, ok, sec in runs)}. "
        f"{total:,} requests, {fivexx} answered 5xx.",
        "",
        "| app | operation | requests | status: count | slowest ms |",
        "| --- | --- | --- | --- | --- |",
        *rows,
    ])  # fmt: skip
    print(body)
    write_section("Explore: schema-driven API fuzzing", body)
    if not all(ok for _, ok, _ in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
