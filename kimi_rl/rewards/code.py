"""The `code` verifier: run the response's program against the problem's test cases in the
sandbox (kimi_rl/rewards/sandbox.py), one sandbox per test case.

The program is the last fenced block opened by ```python (also ```py, ```python3; any case;
the fence may be indented) and closed by a line holding only ``` ; a block left open does not
count, nor does a block of another language or none (a ```python line inside one is text).
No program, or one over MAX_PROGRAM_CHARS, scores 0.

Test cases (`Problem.tests`, a JSON list; each a JSON object) come in two forms:

    {"input": "1 2\\n", "output": "3\\n"}            stdin/stdout: the program reads `input`
                                                      on stdin and must print `output`
    {"fn_name": "add", "args": [1, 2], "output": 3}  function call: the program is executed,
                                                      then fn_name(*args) is called (a method
                                                      of class Solution if there is no such
                                                      function) and must return `output`

stdout matches when, line by line, it equals `output` with trailing whitespace removed from
each line and trailing blank lines dropped. A function's result matches when it equals
`output` after a JSON round trip (tuples become lists). The program must also exit with
code 0 within the sandbox's limits; a timeout, an output past its limit, a crash or a
process left running fails the test.

Reward: 1.0 if every test passes, else 0.0 (tests run in order and stop at the first
failure); with `reward="fraction"` the share of tests passed. A code problem without test
cases is a data error (ValueError naming it), not a 0.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..data.problems import Problem
from .sandbox import Limits, resolve_python, root_plan, run_python

MAX_PROGRAM_CHARS = 100_000
CODE_REWARDS = ("all", "fraction")
DEFAULT_LIMITS = Limits()

PYTHON_FENCES = ("python", "py", "python3")

# runs the program as module `solution`, then the call; the program's own prints go to
# stderr so that stdout holds only the JSON result
_CALL_HARNESS = """\
import json, sys
out, sys.stdout = sys.stdout, sys.stderr
with open("call.json") as f:
    call = json.load(f)
ns = {"__name__": "solution"}
with open("solution.py") as f:
    exec(compile(f.read(), "solution.py", "exec"), ns)
fn = ns.get(call["fn_name"])
if not callable(fn):
    fn = getattr(ns["Solution"](), call["fn_name"])
result = fn(*call["args"])
out.write(json.dumps(result))
out.flush()
"""


def extract_program(response: str) -> str | None:
    """The content of the last complete ```python fenced block, or None. One pass over the
    lines, as Markdown reads fences: a block of another language (or none) is skipped whole,
    and only a line holding just ``` closes a block."""
    last, block, other = None, None, False
    for line in response.splitlines(keepends=True):
        s = line.strip()
        if block is not None or other:
            if s == "```":
                if block is not None:
                    last = "".join(block)
                block, other = None, False
            elif block is not None:
                block.append(line)
        elif s.startswith("```"):
            if s[3:].strip().lower() in PYTHON_FENCES:
                block = []
            else:
                other = True
    return last


def _lines(text: str) -> list[str]:
    return [ln.rstrip() for ln in text.rstrip().splitlines()]


def _json_equal(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


class CodeVerifier:
    """Scores responses to code problems in sandboxes. Call it on one response, or
    `batch` on many: up to `workers` sandboxes run at once (threads, each waiting on its
    sandbox's processes)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, workers: int | None = None,
                 python: str = "python3", reward: str = "all"):
        if reward not in CODE_REWARDS:
            raise ValueError(f"reward.code_reward: unknown value {reward!r} "
                             f"(choose from {list(CODE_REWARDS)})")
        if workers is not None and workers < 1:
            raise ValueError(f"reward.verify_workers: must be >= 1 (or null for the CPU "
                             f"count), got {workers!r}")
        self.limits, self.python, self.reward = limits, python, reward
        self.workers = workers or os.cpu_count() or 1

    @classmethod
    def from_config(cls, reward: Any) -> CodeVerifier:
        """From a RewardConfig (kimi_rl/config.py): reward.sandbox_* limits and extra_dirs,
        verify_workers, sandbox_python, code_reward."""
        try:
            limits = Limits(**{key: getattr(reward, f"sandbox_{key}") for key in
                               ("time_s", "memory_mb", "output_bytes", "processes", "files_mb",
                                "extra_dirs")})
        except ValueError as e:
            raise ValueError(f"reward.sandbox_{e}") from None
        # fail now, naming it, if the interpreter or a directory cannot be shown
        root_plan(resolve_python(reward.sandbox_python), limits.extra_dirs)
        return cls(limits, reward.verify_workers, reward.sandbox_python, reward.code_reward)

    def __call__(self, problem: Problem, response: str) -> float:
        tests = problem.test_cases
        if not tests:
            raise ValueError(f"code problem {problem.id!r} has no test cases ('tests')")
        program = extract_program(response)
        if program is None or len(program) > MAX_PROGRAM_CHARS:
            return 0.0
        passed = 0
        for i, case in enumerate(tests):
            if self.run_test(program, case, f"{problem.id!r} test {i}"):
                passed += 1
            elif self.reward == "all":
                return 0.0
        return passed / len(tests) if self.reward == "fraction" else 1.0

    def batch(self, problems: Sequence[Problem], responses: Sequence[str]) -> list[float]:
        """Scores of many responses, in parallel sandboxes; the same as calling one by one."""
        if len(problems) != len(responses):
            raise ValueError(f"{len(problems)} problems for {len(responses)} responses")
        if len(problems) <= 1 or self.workers == 1:
            return [self(p, r) for p, r in zip(problems, responses, strict=True)]
        with ThreadPoolExecutor(min(self.workers, len(problems))) as pool:
            return list(pool.map(self, problems, responses))

    def run_test(self, program: str, case: Any, where: str) -> bool:
        """Does `program` pass one test case? A malformed case raises ValueError."""
        if not isinstance(case, dict) or "output" not in case:
            raise ValueError(f"code problem {where}: a test case must be an object with "
                             f"'output' and either 'input' or 'fn_name' and 'args', got "
                             f"{case!r:.200}")
        if "fn_name" in case:
            args = case.get("args", [])
            if not isinstance(args, list):
                raise ValueError(f"code problem {where}: 'args' must be a list, got {args!r:.200}")
            call = json.dumps({"fn_name": case["fn_name"], "args": args})
            run = run_python(_CALL_HARNESS, b"", self.limits, self.python,
                             files={"solution.py": program, "call.json": call})
            if run.status != "ok":
                return False
            try:
                return _json_equal(json.loads(run.stdout), case["output"])
            except ValueError:
                return False
        if not isinstance(case.get("input"), str) or not isinstance(case["output"], str):
            raise ValueError(f"code problem {where}: 'input' and 'output' must be strings, "
                             f"got {case!r:.200}")
        run = run_python(program, case["input"].encode(), self.limits, self.python)
        return run.status == "ok" and _lines(run.stdout.decode(errors="replace")) == _lines(
            case["output"])
