"""Held-out evaluation per difficulty level: greedy accuracy, and pass@k / maj@k over
n sampled responses per problem."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from . import checkpoint
from .build import build_engine, build_policy
from .config import TrainConfig
from .data import load_task, modsum, reasoning_gym
from .data.problems import Problem
from .prompts import RAW, PromptFormat, prompt_format
from .rewards.code import extract_program
from .rewards.verify import answer_view, final_answer, get_verifier, normalise_answer
from .rollout.engine import RolloutEngine, SamplingParams
from .rollout.samples import generate_groups


def evaluate(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase,
             problems: Sequence[Problem], max_new_tokens: int,
             params: SamplingParams | None = None, fmt: PromptFormat | None = None) -> dict:
    """Accuracy per level (one response per problem), also per task and level, and the mean
    token length of the correct responses per level, prompts in the prompt format `fmt`
    (default raw). Returns {"accuracy": {level: acc}, "by_task": {task: {level: acc}},
    "correct_length": {level: mean}, "samples": [...]}; tasks as `task_name` names them."""
    params = params or SamplingParams(greedy=True)
    fmt = fmt or RAW
    samples = generate_groups(engine, tokenizer, problems, 1, max_new_tokens, params, fmt)
    hits: dict[int, list[float]] = defaultdict(list)
    lengths: dict[int, list[int]] = defaultdict(list)
    task_hits: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        ok = get_verifier(s.problem.task, answer=fmt.answer_location)(s.problem, s.text)
        hits[s.problem.level].append(ok)
        task_hits[task_name(s.problem)][s.problem.level].append(ok)
        if ok:
            lengths[s.problem.level].append(len(s.tokens))
    return {
        "accuracy": {lv: sum(v) / len(v) for lv, v in sorted(hits.items())},
        "by_task": {name: {lv: sum(v) / len(v) for lv, v in sorted(by_level.items())}
                    for name, by_level in sorted(task_hits.items())},
        "correct_length": {lv: sum(v) / len(v) for lv, v in sorted(lengths.items())},
        "samples": samples,
    }


def task_name(problem: Problem) -> str:
    """The task a problem is reported under: a reasoning-gym problem's dataset (chain_sum,
    countdown, ...), else its verifier's task (modsum, math, code, ...)."""
    if problem.task == reasoning_gym.TASK:
        return reasoning_gym.entry_of(problem)[0]
    return problem.task


def format_accuracy(title: str, acc: dict[int, float]) -> str:
    cells = "  ".join(f"L{lv}: {100 * a:5.1f}" for lv, a in sorted(acc.items()))
    return f"{title:<22} {cells}"


def task_lines(by_task: dict[str, dict[int, float]]) -> list[str]:
    """A line of accuracy per level for each task, where there are several (one task: its
    figures are the per-level line's)."""
    if len(by_task) < 2:
        return []
    return [format_accuracy(f"  {name}", acc) for name, acc in by_task.items()]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n responses of which c are correct: the chance that k of them,
    drawn without replacement, hold a correct one, 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer; a tie goes to the answer seen first. None answers (no
    final answer found) do not vote; None if no response has an answer."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first


def math_answer(response: str) -> str | None:
    """The final answer (last box or answer line), normalised."""
    answer = final_answer(response)
    return None if answer is None else normalise_answer(answer)


# task -> the final answer of a response, as votes compare it (the verifier's view of it)
ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "modsum": modsum.extract_answer,  # the final `answer N` line
    "math": math_answer,
    "reasoning_gym": math_answer,  # scored on the same extraction as math
    "code": extract_program,  # identical programs vote together
}


def answer_extractor(task: str) -> Callable[[str], str | None]:
    if task not in ANSWER_EXTRACTORS:
        raise ValueError(f"no answer extractor for task {task!r} "
                         f"(choose from {sorted(ANSWER_EXTRACTORS)})")
    return ANSWER_EXTRACTORS[task]


def by_level(problems: Sequence[Problem], values: Sequence[float]) -> dict[str, float]:
    """Mean per level ("1", "2", ... in order) and over all problems ("all")."""
    groups: dict[int, list[float]] = defaultdict(list)
    for p, v in zip(problems, values, strict=True):
        groups[p.level].append(v)
    out = {str(lv): sum(v) / len(v) for lv, v in sorted(groups.items())}
    out["all"] = sum(values) / len(values)
    return out


def sampled_metrics(engine: RolloutEngine, tokenizer: PreTrainedTokenizerBase,
                    problems: Sequence[Problem], n: int, ks: Sequence[int],
                    max_new_tokens: int, params: SamplingParams,
                    fmt: PromptFormat | None = None) -> dict:
    """pass@k and maj@k from n sampled responses per problem (one engine call), per level
    and over all problems: {"pass@k": {"k": {"level": v, ..., "all": v}}, "maj@k": ...,
    "by_task": {task: {"pass@k": ..., "maj@k": ...}}} (task_name's tasks, each over its own
    problems).

    pass@k: the unbiased estimate from all n responses (correct: verifier score 1).
    maj@k: a majority vote over the final answers of the first k responses, scored by the
    verifier on the first of them that carries the voted answer (0 if none has an answer).
    """
    fmt = fmt or RAW
    where = fmt.answer_location
    samples = generate_groups(engine, tokenizer, problems, n, max_new_tokens, params, fmt)
    pass_k: dict[int, list[float]] = {k: [] for k in ks}
    maj_k: dict[int, list[float]] = {k: [] for k in ks}
    for i, p in enumerate(problems):
        texts = [s.text for s in samples[i * n:(i + 1) * n]]
        scores = [get_verifier(p.task, answer=where)(p, t) for t in texts]
        answers = [answer_extractor(p.task)(answer_view(t, p.task, where)) for t in texts]
        correct = sum(x == 1.0 for x in scores)
        for k in ks:
            pass_k[k].append(pass_at_k(n, correct, k))
            vote = majority(answers[:k])
            maj_k[k].append(0.0 if vote is None else scores[answers.index(vote)])
    metrics = (("pass@k", pass_k), ("maj@k", maj_k))
    out: dict = {name: {str(k): by_level(problems, v[k]) for k in ks} for name, v in metrics}
    names = [task_name(p) for p in problems]
    out["by_task"] = {}
    for task in dict.fromkeys(names):
        mine = [i for i, nm in enumerate(names) if nm == task]
        out["by_task"][task] = {
            name: {str(k): by_level([problems[i] for i in mine], [v[k][i] for i in mine])
                   for k in ks} for name, v in metrics}
    return out


def format_metrics(metrics: dict) -> str:
    """A table: a row per level and one for all problems, a column per pass@k, maj@k."""
    cols = [(f"{name[:-1]}{k}", per_level) for name in ("pass@k", "maj@k")
            for k, per_level in metrics[name].items()]
    rows = [f"{'level':<6}" + "".join(f"{title:>9}" for title, _ in cols)]
    for lv in cols[0][1]:
        label = lv if lv == "all" else f"L{lv}"
        rows.append(f"{label:<6}" + "".join(f"{100 * v[lv]:9.1f}" for _, v in cols))
    return "\n".join(rows)


def run_evaluation(cfg, out_dir, prompt_given: bool = False) -> dict:
    """`kimi-rl eval`: held-out accuracy of a run's latest checkpoint (eval.checkpoint=<run
    dir>) or of model.path, greedy, and with eval.samples=n also pass@k and maj@k for
    k in eval.k from n responses per problem sampled at rollout.temperature and
    rollout.top_p (seed eval.seed), written to <out_dir>/eval.json (per task too: `by_task`
    for the greedy accuracy, `sampled_by_task` for pass@k and maj@k).

    The problems are the task's held-out split (for a JSONL file, up to
    data.test_per_level per level, never more than a fifth of a level's problems); when
    that split is empty (data.test_per_level=0, or a file too small), every problem.

    A checkpoint is evaluated with the prompt format it was trained with, unless the
    command gives one (`prompt_given`: a `prompt=` or `prompt.*` override)."""
    n, ks = cfg.eval.samples, list(cfg.eval.k)
    if n < 0 or (n and (not ks or not all(1 <= k <= n for k in ks))):
        raise ValueError(f"eval.k={ks}: each k must be in 1..eval.samples={n} "
                         "(eval.samples=0: no sampling)")
    task = load_task(cfg.data)
    problems = task.test or task.train
    if not task.test:
        print(f"no held-out problems: evaluating on all {len(problems)} problems")
    fmt = prompt_format(cfg)
    if cfg.eval.checkpoint:
        state = checkpoint.load(checkpoint.latest(cfg.eval.checkpoint))
        saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), state["config"])
        policy, tokenizer = build_policy(saved, task)
        policy.load_state_dict(state["policy"])
        if not prompt_given:  # the run's own prompt format
            fmt = prompt_format(saved)
            cfg = OmegaConf.merge(cfg, {"prompt": saved.prompt})
    else:
        policy, tokenizer = build_policy(cfg, task)
    engine = build_engine(cfg, policy, tokenizer)
    result = evaluate(engine, tokenizer, problems, cfg.eval.max_new_tokens, fmt=fmt)
    print(format_accuracy("held-out accuracy", result["accuracy"]))
    for line in task_lines(result["by_task"]):
        print(line)
    out = {"accuracy": result["accuracy"], "by_task": result["by_task"],
           "correct_length": result["correct_length"], "prompt_format": cfg.prompt.format}
    if n:
        params = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, seed=cfg.eval.seed)
        metrics = sampled_metrics(engine, tokenizer, problems, n, ks,
                                  cfg.eval.max_new_tokens, params, fmt)
        print(f"{n} samples per problem (temperature {params.temperature}, "
              f"top_p {params.top_p}), %:")
        print(format_metrics(metrics))
        if len(metrics["by_task"]) > 1:
            for task, per_task in metrics["by_task"].items():
                print(f"{task}:\n{format_metrics(per_task)}")
        out.update({k: v for k, v in metrics.items() if k != "by_task"})
        out["sampled_by_task"] = metrics["by_task"]
        out["sampling"] = {"samples": n, "temperature": params.temperature,
                           "top_p": params.top_p, "seed": params.seed}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "eval.json").write_text(json.dumps(out, indent=2))
    return out
