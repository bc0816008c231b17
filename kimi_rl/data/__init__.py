"""Problem sources: the built-in graded task, or a problem file (JSONL, Parquet or a saved
`datasets` directory; see `problems` for the schema)."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from ..config import DataConfig
from . import modsum, reasoning_gym
from .problems import DataError, LoadReport, Problem, load_jsonl, load_problems

__all__ = ["DataError", "LoadReport", "Problem", "TaskData", "load_task", "load_jsonl",
           "load_problems"]


@dataclass
class TaskData:
    train: list[Problem]
    test: list[Problem]
    demos: dict[int, int] = field(default_factory=dict)  # level -> demonstrations for SFT
    flawed: dict[int, float] = field(default_factory=dict)  # level -> flawed share
    flaw: str = "stop_early"  # how the flawed demonstrations err (modsum.FLAWS)
    vocabulary: list[str] | None = None  # characters, for the built-in tokenizer
    # reasoning-gym: dataset -> level -> demonstrations (kimi_rl.data.reasoning_gym)
    rg_demos: dict[str, dict[int, int]] = field(default_factory=dict)

    def _flaw(self, rng: random.Random, level: int) -> str | None:
        """The flaw of the next demonstration of `level` (one draw): `flaw` with
        probability `flawed[level]`, else None (a right one)."""
        return self.flaw if rng.random() < self.flawed.get(level, 0.0) else None

    def demonstrations(self, confirm_prob: float, seed: int) -> list[tuple[Problem, str]]:
        """(problem, chain-of-thought response) pairs for the SFT cold start; a share
        `confirm_prob` of them close with the redundant confirmation line."""
        rng = random.Random(seed)
        taken: dict[int, int] = {}
        out = []
        for p in self.train:
            if p.task == "modsum" and taken.get(p.level, 0) < self.demos.get(p.level, 0):
                taken[p.level] = taken.get(p.level, 0) + 1
                confirm = rng.random() < confirm_prob
                out.append((p, modsum.demonstration(p, confirm, self._flaw(rng, p.level))))
        rg_taken: dict[tuple[str, int], int] = {}
        for p in self.train if self.rg_demos else ():
            if p.task != reasoning_gym.TASK:
                continue
            key = (reasoning_gym.entry_of(p)[0], p.level)
            if rg_taken.get(key, 0) < self.rg_demos.get(key[0], {}).get(p.level, 0):
                demo = reasoning_gym.demonstration(p, self._flaw(rng, p.level))
                if demo is not None:
                    rg_taken[key] = rg_taken.get(key, 0) + 1
                    out.append((p, demo))
        for name, by_level in self.rg_demos.items():
            for level, want in sorted(by_level.items()):
                if rg_taken.get((name, level), 0) < want:
                    print(f"reasoning-gym {name} level {level}: {rg_taken.get((name, level), 0)}"
                          f" demonstrations, {want} asked for (training problems the teacher "
                          f"can solve)", file=sys.stderr, flush=True)
        return out

    @property
    def levels(self) -> list[int]:
        return sorted({p.level for p in self.train} | {p.level for p in self.test})


def load_task(cfg: DataConfig) -> TaskData:
    if cfg.path:
        # rows without a task: data.task, except the built-in default (files are math)
        row_task = "math" if cfg.task == "modsum" else cfg.task
        problems, report = load_problems(cfg.path, row_task, dict(cfg.columns), cfg.bad_rows)
        if report.skipped:
            print(report.summary(), file=sys.stderr, flush=True)
        rng = random.Random(cfg.seed)
        test_ids = set()
        for level in sorted({p.level for p in problems}):
            ids = [p.id for p in problems if p.level == level]
            test_ids |= set(rng.sample(ids, min(cfg.test_per_level, len(ids) // 5)))
        return TaskData(
            train=[p for p in problems if p.id not in test_ids],
            test=[p for p in problems if p.id in test_ids],
        )
    # the built-in teachers' imperfection (modsum and reasoning-gym)
    teacher = {"flaw": cfg.flaw, "flawed": {int(k): float(v) for k, v in cfg.flawed.items()}}
    if cfg.task == reasoning_gym.TASK:
        plain = OmegaConf.to_container if OmegaConf.is_config(cfg) else dict
        train, test = reasoning_gym.generate(
            list(cfg.rg_datasets), plain(cfg.rg_levels), cfg.train_per_level,
            cfg.test_per_level, cfg.seed)
        rg_demos = reasoning_gym.demo_table(list(cfg.rg_datasets), plain(cfg.rg_levels),
                                            plain(cfg.rg_demos))
        return TaskData(train, test, vocabulary=reasoning_gym.vocabulary(train + test),
                        rg_demos=rg_demos, **teacher)
    if cfg.task != "modsum":
        raise ValueError(f"data.task: unknown built-in task {cfg.task!r} "
                         f"(choose from ['modsum', '{reasoning_gym.TASK}'])")
    demos = {int(k): int(v) for k, v in cfg.demos.items() if int(v) > 0}
    bad = sorted(set(demos) - set(cfg.levels))
    if bad:
        zero = ", ".join(f"{lv}: 0" for lv in bad)
        raise ValueError(f"data.demos: levels {bad} are not in data.levels {list(cfg.levels)} "
                         f"(a mapping override merges with the experiment's: add "
                         f"'data.demos={{{zero}}}')")
    train, test = modsum.generate(list(cfg.levels), cfg.train_per_level, cfg.test_per_level,
                                  cfg.seed)
    return TaskData(train, test, demos=demos, **teacher, vocabulary=modsum.vocabulary())
