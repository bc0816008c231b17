"""Report of an ablation sweep (`kimi-rl train --multirun ...`): per configuration, the mean
and spread over seeds of held-out accuracy per level at the end of RL, iterations to reach
a held-out accuracy threshold (90%) on the hardest trained level, mean correct-response
length and tokens generated; a missing or failed run is named, never dropped.

    python bench/ablations.py SWEEP_DIR [SWEEP_DIR ...] [--threshold 0.9] [--out DIR]

SWEEP_DIR is the multirun directory (hydra.sweep.dir): Hydra's multirun.yaml (the sweep as
given on the command line) and one directory per job (.hydra/overrides.yaml, and the run's
summary.json once it has finished). The intended jobs are the sweep's cartesian product,
as Hydra's basic sweeper expands it; a job directory matches the job whose overrides it
has (a job resumed with its overrides and resume=<its directory> still matches); a job
without a directory is `missing`, a directory without summary.json (crashed, stopped,
still running) `failed`. Several SWEEP_DIRs are one sweep launched in parts (for example
one multirun per seed, side by side on the cores of one machine): their jobs are reported
together, and a job (the same overrides) found in two of them is an error. A configuration
is a job's
overrides without `seed`, less those shared by every job and those that follow the seed
(one value per seed, different between seeds: e.g. each seed's shared cold start,
`sft.from_run=...`); one varying key: its value alone, e.g. `grpo` for `ablation=grpo`.

From each run's summary.json:
- accuracy at the end: `eval_after` (greedy held-out accuracy per level after RL);
- the curve: `eval_before` at iteration 0, `eval_it<N>` (every eval.every iterations) at
  N, `eval_after` at `iterations`; the hardest level is the highest of `trained_levels`;
  iterations to the threshold: the first evaluated iteration at which that level's
  accuracy is at least the threshold, or never (null);
- `correct_length_final` (mean token length of correct held-out responses, sampled, over
  the trained levels), `generated_tokens` (rollout tokens generated over the run).

Spread: the standard deviation over seeds (n - 1 in the denominator; none for one seed).
Writes SWEEP_DIR/ablations.md (the table, with failed and missing runs below it) and
SWEEP_DIR/ablations.png (hardest-level accuracy against iteration: the mean over seeds per
configuration, the seeds' min-max range shaded), or into --out. Prints the table and a
final JSON line: {"sweep_dir", "threshold", "configurations": [...], "failed": [...],
"missing": [...], "table", "plot"}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

THRESHOLD = 0.9
# The documented sweep (README "Ablations"): every variant of conf/ablation/ but `none`,
# against the default, three seeds each.
VARIANTS = ("default", "grpo", "reinforce", "curriculum_only", "uniform",
            "no_length_penalty", "no_partial")
RECIPE = ["experiment=ablation", f"ablation={','.join(VARIANTS)}", "seed=0,1,2"]


@dataclass
class Run:
    """One job of the sweep: its directory (None: missing), overrides and summary."""

    overrides: list[str]
    dir: Path | None = None
    seed: int | None = None
    summary: dict | None = None
    problem: str | None = None  # why there is no summary

    @property
    def name(self) -> str:
        return self.dir.name if self.dir else " ".join(self.overrides)


@dataclass
class Configuration:
    name: str
    overrides: list[str]
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.summary is not None]


def override_key(override: str) -> str:
    """`key` of `key=value` (also +key=, ++key=, ~key=)."""
    return override.split("=", 1)[0].lstrip("+~")


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The jobs of a sweep given as command-line overrides, in job-number order: the
    cartesian product of the swept values, as Hydra's basic sweeper expands it."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def read_sweep(sweep_dir: Path) -> tuple[list[Run], str | None]:
    """Every intended job (from multirun.yaml) and every job directory found, matched by
    their overrides; and a note when the intended set could not be read."""
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such directory (the sweep's hydra.sweep.dir)")
    found = [read_job(d) for d in sorted(sweep_dir.iterdir(), key=job_order)
             if d.is_dir() and ((d / ".hydra" / "overrides.yaml").is_file()
                                or (d / "summary.json").is_file())]
    note = None
    multirun = sweep_dir / "multirun.yaml"
    intended: list[list[str]] | None = None
    if multirun.is_file():
        try:
            task = OmegaConf.load(multirun).hydra.overrides.task
            intended = expand_sweep(list(task))
        except Exception as e:  # noqa: BLE001 (the report still lists the jobs found)
            note = f"{multirun}: the intended jobs could not be read ({e}); missing runs unknown"
    else:
        note = f"{multirun}: not found; missing runs unknown"
    if not found and intended is None:
        raise FileNotFoundError(f"{sweep_dir}: neither multirun.yaml nor job directories "
                                f"(.hydra/overrides.yaml or summary.json in a subdirectory)")
    if intended is None:
        return found, note
    runs, left = [], list(found)
    for job in intended:
        match = (next((r for r in left if r.overrides == job), None)
                 or next((r for r in left if set(job) <= set(r.overrides)), None))
        if match is None:
            runs.append(Run(job, seed=seed_of(job), problem="no job directory"))
        else:  # exactly its overrides, or (resumed with resume=<dir>) more of them
            left.remove(match)
            match.overrides = job
            runs.append(match)
    return runs + left, note  # directories of jobs outside the sweep's product: kept


def job_order(d: Path) -> tuple:
    """Job directories by their leading job number (Hydra's `N` or `N-...`), then name."""
    head = d.name.split("-", 1)[0]
    return (0, int(head), d.name) if head.isdigit() else (1, 0, d.name)


def seed_of(overrides: list[str]) -> int | None:
    for o in overrides:
        if override_key(o) == "seed":
            try:
                return int(o.split("=", 1)[1])
            except ValueError:
                return None
    return None


def read_job(d: Path) -> Run:
    """A job directory: its overrides, seed and summary.json, or why it has none."""
    ov_file = d / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(ov_file)] if ov_file.is_file() else []
    run = Run(overrides, d, seed_of(overrides))
    cfg_file = d / ".hydra" / "config.yaml"
    if cfg_file.is_file():
        seed = OmegaConf.load(cfg_file).get("seed")
        run.seed = int(seed) if isinstance(seed, int) else run.seed
    summary = d / "summary.json"
    if not ov_file.is_file():
        run.problem = f"{ov_file}: not found, its configuration is unknown"
    elif not summary.is_file():
        latest = d / "checkpoints" / "latest"
        last = f"; last checkpoint {latest.read_text().strip()}" if latest.is_file() else ""
        run.problem = f"no summary.json (crashed, stopped or still running{last})"
    else:
        try:
            data = json.loads(summary.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            run.problem = f"{summary}: unreadable ({e})"
            return run
        if not isinstance(data, dict) or not data.get("trained_levels"):
            run.problem = f"{summary}: no trained_levels (not a finished run's summary)"
        else:
            run.summary = data
    return run


def _value(overrides: list[str], key: str) -> str | None:
    return next((o for o in overrides if override_key(o) == key), None)


def _follows_seed(runs: list[Run], key: str) -> bool:
    """Whether `key` takes one value per seed and differs between seeds (for example each
    seed's shared cold start, sft.from_run=.../seed<N>): part of the seed, not of the
    configuration."""
    by_seed: dict[int | None, set[str | None]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, set()).add(_value(r.overrides, key))
    return (all(len(v) == 1 for v in by_seed.values())
            and len({next(iter(v)) for v in by_seed.values()}) > 1)


def configurations(runs: list[Run]) -> list[Configuration]:
    """Runs grouped by their overrides without seed, named by what varies between them;
    in order of first appearance (job order). Runs without overrides are left out."""
    known = [r for r in runs if r.overrides]
    keys: dict[str, set[str]] = {}
    for r in known:
        for o in r.overrides:
            keys.setdefault(override_key(o), set()).add(o)
    per_seed = {k for k in keys if k != "seed" and _follows_seed(known, k)}
    varying = {k for k, values in keys.items() if k != "seed" and k not in per_seed and (
        len(values) > 1 or any(not any(override_key(o) == k for o in r.overrides)
                               for r in known))}
    out: dict[tuple, Configuration] = {}
    for r in known:
        own = [o for o in r.overrides if override_key(o) in varying]
        key = tuple(own)
        if key not in out:
            name = (own[0].split("=", 1)[1] if len(own) == 1 and len(varying) == 1
                    else " ".join(own) or "default")
            out[key] = Configuration(name, [o for o in r.overrides
                                            if override_key(o) != "seed"
                                            and override_key(o) not in per_seed])
        out[key].runs.append(r)
    for c in out.values():
        c.runs.sort(key=lambda r: (r.seed is None, r.seed or 0))
    return list(out.values())


def curve(summary: dict) -> list[tuple[int, float]]:
    """(iteration, held-out accuracy on the hardest trained level) at each evaluation:
    eval_before at 0, eval_it<N> at N, eval_after at the last iteration; sorted."""
    level = str(hardest_level(summary))
    points: dict[int, float] = {}
    evals = [(0, summary.get("eval_before"))]
    evals += [(int(key[7:]), acc) for key, acc in summary.items()
              if key.startswith("eval_it") and key[7:].isdigit()]
    if summary.get("iterations") is not None:
        evals.append((int(summary["iterations"]), summary.get("eval_after")))
    points: dict[int, float] = {}
    for it, acc in evals:
        if acc and acc.get(level) is not None:
            points.setdefault(it, acc[level])
    return sorted(points.items())


def hardest_level(summary: dict) -> int:
    return max(int(lv) for lv in summary["trained_levels"])


def iterations_to(points: list[tuple[int, float]], threshold: float) -> int | None:
    """The first evaluated iteration whose accuracy is at least `threshold`; None if none."""
    return next((it for it, acc in points if acc >= threshold - 1e-9), None)


def stats(values: list[float | None]) -> dict:
    """Mean and sample standard deviation of the values given (None: not counted)."""
    xs = [v for v in values if v is not None]
    mean = sum(xs) / len(xs) if xs else None
    sd = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
          if len(xs) > 1 else None)
    return {"mean": mean, "sd": sd, "n": len(xs), "values": values}


def aggregate(c: Configuration, threshold: float) -> dict:
    ok = c.ok
    levels = sorted({int(lv) for r in ok for lv in (r.summary.get("eval_after") or {})})
    to_threshold = [iterations_to(curve(r.summary), threshold) for r in ok]
    reached = [v for v in to_threshold if v is not None]
    return {
        "name": c.name, "overrides": c.overrides,
        "runs": len(c.runs), "finished": len(ok),
        "seeds": [r.seed for r in ok],
        "hardest_level": sorted({hardest_level(r.summary) for r in ok}),
        "accuracy_end": {lv: stats([(r.summary.get("eval_after") or {}).get(str(lv))
                                    for r in ok]) for lv in levels},
        "iterations_to_threshold": {"values": to_threshold, "reached": len(reached),
                                    "mean_of_reached": stats(reached)["mean"]},
        "correct_length": stats([r.summary.get("correct_length_final") for r in ok]),
        "generated_tokens": stats([r.summary.get("generated_tokens") for r in ok]),
        "wall_seconds": stats([r.summary.get("wall_seconds") for r in ok]),
        "curves": [{"seed": r.seed, "points": curve(r.summary)} for r in ok],
    }


def fmt(s: dict, scale: float = 1.0, digits: int = 1) -> str:
    if s["mean"] is None:
        return "-"
    text = f"{s['mean'] * scale:.{digits}f}"
    return text + (f" ± {s['sd'] * scale:.{digits}f}" if s["sd"] is not None else "")


def table(rows: list[dict], failed: list[Run], missing: list[Run], threshold: float,
          note: str | None) -> str:
    """The markdown table, with the failed and missing runs named below it."""
    levels = sorted({lv for r in rows for lv in r["accuracy_end"]})
    pct = f"{100 * threshold:g}%"
    head = (["configuration", "runs"] + [f"L{lv} %" for lv in levels]
            + [f"iterations to {pct}", "correct length", "tokens generated"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        its = r["iterations_to_threshold"]["values"]
        cells = ([r["name"], f"{r['finished']}/{r['runs']}"]
                 + [fmt(r["accuracy_end"][lv], 100) if lv in r["accuracy_end"] else "-"
                    for lv in levels]
                 + [" / ".join("never" if v is None else str(v) for v in its) or "-",
                    fmt(r["correct_length"]), fmt(r["generated_tokens"], 1, 0)])
        lines.append("| " + " | ".join(cells) + " |")
    hard = sorted({lv for r in rows for lv in r["hardest_level"]})
    lines += ["", f"Held-out greedy accuracy per level after RL, mean ± sd over seeds; "
              f"iterations to {pct} on the hardest trained level (L"
              f"{', L'.join(map(str, hard)) or '?'}) per seed, from the periodic "
              f"evaluations (never: not within the run); correct length: mean tokens of "
              f"correct held-out responses (sampled) at the end; tokens generated by the "
              f"rollouts over the run. Runs: finished / intended."]
    for r in failed:
        lines.append(f"- FAILED {r.name} (seed {r.seed}): {r.problem}")
    for r in missing:
        lines.append(f"- MISSING {' '.join(r.overrides)}: {r.problem}")
    if note:
        lines.append(f"- NOTE {note}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], threshold: float, path: Path) -> None:
    """Hardest-level held-out accuracy against iteration: per configuration the mean over
    seeds at each evaluated iteration, its seeds' min-max range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        by_it: dict[int, list[float]] = {}
        for c in r["curves"]:
            for it, acc in c["points"]:
                by_it.setdefault(it, []).append(acc)
        if not by_it:
            continue
        its = sorted(by_it)
        mean = [100 * sum(by_it[i]) / len(by_it[i]) for i in its]
        line, = ax.plot(its, mean, marker="o", ms=3,
                        label=f"{r['name']} (L{'/'.join(map(str, r['hardest_level']))}, "
                              f"{r['finished']} seeds)")
        ax.fill_between(its, [100 * min(by_it[i]) for i in its],
                        [100 * max(by_it[i]) for i in its], color=line.get_color(), alpha=0.2)
    drawn = bool(ax.get_lines())
    ax.axhline(100 * threshold, color="grey", ls="--", lw=1)
    ax.set_xlabel("RL iteration (0: SFT start)")
    ax.set_ylabel("held-out accuracy, hardest trained level (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("Ablations: mean over seeds, min-max shaded")
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no finished run", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_sweeps(sweep_dirs: list[Path]) -> tuple[list[Run], str | None]:
    """The jobs of one sweep launched in parts (read_sweep of each directory), in the order
    given; a job whose overrides are in two parts is an error (its seed would count twice)."""
    runs: list[Run] = []
    notes: list[str] = []
    where: dict[tuple[str, ...], Path] = {}
    for d in sweep_dirs:
        part, note = read_sweep(d)
        for r in part:
            key = tuple(sorted(o for o in r.overrides if override_key(o) != "resume"))
            if key in where and where[key] != d:
                raise ValueError(f"the job {' '.join(r.overrides)} is in two sweep "
                                 f"directories: {where[key]} and {d}")
            where[key] = d
        runs += part
        if note:
            notes.append(note)
    return runs, "; ".join(notes) or None


def report(sweep_dir: Path | list[Path], threshold: float = THRESHOLD,
           out: Path | None = None) -> dict:
    """Read the sweep (one directory, or the parts of one sweep), write the table and plot
    into `out` (default: the first sweep directory) and return the report (the final JSON
    line)."""
    dirs = [sweep_dir] if isinstance(sweep_dir, Path) else list(sweep_dir)
    runs, note = read_sweeps(dirs)
    sweep_dir = dirs[0]
    out = out or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = [aggregate(c, threshold) for c in configurations(runs)]
    failed = [r for r in runs if r.dir is not None and r.summary is None]
    missing = [r for r in runs if r.dir is None]
    text = table(rows, failed, missing, threshold, note)
    (out / "ablations.md").write_text(text)
    plot(rows, threshold, out / "ablations.png")
    return {"sweep_dir": str(sweep_dir), "sweep_dirs": [str(d) for d in dirs],
            "threshold": threshold, "configurations": rows,
            "failed": [{"dir": str(r.dir), "seed": r.seed, "overrides": r.overrides,
                        "problem": r.problem} for r in failed],
            "missing": [{"overrides": r.overrides, "seed": r.seed} for r in missing],
            "note": note, "table": str(out / "ablations.md"), "plot": str(out / "ablations.png"),
            "text": text}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, nargs="+",
                    help="the sweep's multirun directory (or the directories of its parts)")
    ap.add_argument("--threshold", type=float, default=THRESHOLD,
                    help="held-out accuracy on the hardest trained level (default 0.9)")
    ap.add_argument("--out", type=Path, help="where ablations.md/.png go (default: sweep_dir)")
    args = ap.parse_args(argv)
    if not 0 < args.threshold <= 1:
        ap.error(f"--threshold: must be in (0, 1], got {args.threshold}")
    try:
        result = report(args.sweep_dir, args.threshold, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"ablations: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result.pop("text"))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
