"""Per-problem success statistics for prioritized sampling (SPEC.md section 3)."""

from __future__ import annotations

from typing import Any


class ProblemStats:
    """Attempts and successes per problem id; s_i = successes / attempts (SPEC.md section 3).

    Counts are floats so partial credit (a success in [0, 1]) accumulates exactly.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, float] = {}
        self.successes: dict[str, float] = {}

    def update(self, problem_id: str, success: float) -> None:
        """Record one finished rollout of `problem_id` with success in [0, 1]."""
        success = float(success)
        if not 0.0 <= success <= 1.0:
            raise ValueError(f"success for problem {problem_id!r} must be in [0, 1], got {success}")
        self.attempts[problem_id] = self.attempts.get(problem_id, 0.0) + 1.0
        self.successes[problem_id] = self.successes.get(problem_id, 0.0) + success

    def success_rate(self, problem_id: str) -> float:
        """Observed success rate; 0.0 for an unseen problem, so it is prioritised."""
        attempts = self.attempts.get(problem_id, 0.0)
        return self.successes[problem_id] / attempts if attempts > 0 else 0.0

    def __len__(self) -> int:
        return len(self.attempts)

    def state_dict(self) -> dict[str, Any]:
        return {"attempts": dict(self.attempts), "successes": dict(self.successes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.attempts = {str(k): float(v) for k, v in state["attempts"].items()}
        self.successes = {str(k): float(v) for k, v in state["successes"].items()}
