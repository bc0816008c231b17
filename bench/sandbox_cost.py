"""Cost of one code-sandbox run (kimi_rl/rewards/sandbox.py): wall seconds of `run_python`
on a trivial program, setup and teardown included, as the code verifier pays it per test
case. The first run (which also asks the interpreter for its directories, once per
interpreter) is a warm-up and not counted.

Loads the sandbox module from this checkout by its path (standard library only), so it runs
with any python3 and on any checkout of the repository. Prints one line per run on stderr
and a final JSON line.

    python bench/sandbox_cost.py [--runs 20] [--python python3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

MODULE = Path(__file__).resolve().parents[1] / "kimi_rl" / "rewards" / "sandbox.py"
PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--python", default="python3", help="the sandbox interpreter")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("sandbox_under_test", MODULE)
    sandbox = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sandbox  # dataclasses look their module up
    spec.loader.exec_module(sandbox)
    limits = sandbox.Limits(time_s=4.0, memory_mb=256)
    times = []
    for i in range(args.runs + 1):
        t0 = time.perf_counter()
        run = sandbox.run_python(PROGRAM, b"1 2\n", limits, args.python)
        seconds = time.perf_counter() - t0
        if run.status != "ok" or run.stdout != b"3\n":
            raise SystemExit(f"run {i} failed: {run}")
        print(f"run {i}{' (warm-up)' if i == 0 else ''}: {seconds:.3f} s", file=sys.stderr)
        if i:
            times.append(seconds)
    print(json.dumps({"per_run_s_median": round(statistics.median(times), 4),
                      "per_run_s_min": round(min(times), 4), "runs": len(times),
                      "python": sandbox.resolve_python(args.python)}))


if __name__ == "__main__":
    main()
