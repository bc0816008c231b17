"""Long2short on the demo: the four methods of `kimi-rl long2short` from a finished RL run,
each evaluated on the same held-out problems as the run's own model (the long-CoT start).

    python bench/long2short.py --start runs/<demo run> --out runs/long2short

The task, prompt format and response lengths are the start run's (its config.yaml); the
methods run as `kimi-rl long2short` commands with demo-sized settings (below). Model
merging needs a short-CoT model of the start's architecture: it is the shortest-rejection-
sampling model (SFT on the start's own shortest correct responses), merged with weight
--merge-weight; so `shortest` runs before `merge`.

Accuracy is greedy, per level; "correct_length" is the mean over the levels RL trained on
(the start run's curriculum) of the mean token length of the correct greedy responses.
Prints a table, then the final JSON line
{"start": {"accuracy": {level: acc}, "correct_length": x}, "methods": {name: {...}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("shortest", "merge", "dpo", "rl")  # shortest first: merge uses its model


def trained_levels(run: dict) -> list[int]:
    """Levels with a positive weight in any curriculum stage; else every data level."""
    levels = {int(lv) for st in run.get("curriculum", {}).get("stages", [])
              for lv, w in (st.get("levels") or {}).items() if w > 0}
    return sorted(levels or run["data"]["levels"])


def scalar_length(ev: dict, levels: list[int]) -> float | None:
    vals = [v for lv, v in ev["correct_length"].items() if int(lv) in levels]
    return sum(vals) / len(vals) if vals else None


def method_overrides(method: str, args, out: Path) -> list[str]:
    """Demo-sized settings per method."""
    if method == "shortest":
        return [f"sft.steps={args.sft_steps}"]
    if method == "merge":
        return [f"long2short.merge.short_model={out / 'shortest' / 'hf_model'}",
                f"long2short.merge.short_weight={args.merge_weight}"]
    if method == "dpo":
        return [f"long2short.dpo.steps={args.dpo_steps}"]
    return [f"iterations={args.rl_iterations}", f"checkpoint_every={args.rl_iterations}"]


def start_eval(start: Path, common: list[str]) -> dict:
    """The start's held-out evaluation, as the command evaluates its results."""
    from hydra import compose, initialize_config_module

    from kimi_rl import host
    from kimi_rl.config import register_configs
    from kimi_rl.long2short import held_out, resolve_start

    register_configs()
    with initialize_config_module(config_module="kimi_rl.conf", version_base=None):
        cfg = compose("long2short", overrides=["method=merge", *common])
    cfg = resolve_start(cfg)
    host.setup(cfg.num_threads)
    return json.loads(json.dumps(held_out(cfg, cfg.model.path)))  # levels as eval.json has them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="a finished RL run directory (hf_model/)")
    ap.add_argument("--out", required=True, help="where the methods' run directories go")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=8, help="responses per problem")
    ap.add_argument("--problems", type=int, default=512, help="training problems sampled")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--rl-iterations", type=int, default=20)
    ap.add_argument("--merge-weight", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true",
                    help="keep a method's finished result (its eval.json) in --out")
    args = ap.parse_args()

    start, out = Path(args.start).resolve(), Path(args.out).resolve()
    run = OmegaConf.to_container(OmegaConf.load(start / "config.yaml"))
    levels = trained_levels(run)
    methods = [m for m in args.methods.split(",") if m]
    if "merge" in methods and "shortest" not in methods and not (
            out / "shortest" / "hf_model").is_dir():
        sys.exit("merge needs the shortest method's model (run shortest too)")
    common = [f"long2short.start={start}", f"long2short.levels=[{','.join(map(str, levels))}]",
              f"long2short.samples={args.samples}", f"long2short.problems={args.problems}",
              f"rollout.max_new_tokens={run['rollout']['max_new_tokens']}",
              f"eval.max_new_tokens={run['eval']['max_new_tokens']}",
              f"num_threads={args.threads}", f"seed={args.seed}", "progress=false"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    results, seconds = {}, {}
    base_file = out / "start_eval.json"
    if args.reuse and base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        base = start_eval(start, common)
        out.mkdir(parents=True, exist_ok=True)
        base_file.write_text(json.dumps(base, indent=2))
    for method in sorted(methods, key=METHODS.index):
        run_dir = out / method
        if not (args.reuse and (run_dir / "eval.json").is_file()):
            cmd = [sys.executable, "-m", "kimi_rl.cli", "long2short", f"method={method}",
                   f"run_dir={run_dir}", *common, *method_overrides(method, args, out)]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True, env=env)
        results[method] = json.loads((run_dir / "eval.json").read_text())
        seconds[method] = json.loads((run_dir / "long2short.json").read_text())["train_seconds"]

    x0 = scalar_length(base, levels)
    all_levels = sorted({int(lv) for lv in base["accuracy"]})
    head = f"{'model':<10}" + "".join(f"{'L' + str(lv):>7}" for lv in all_levels)
    print(f"\nheld-out greedy accuracy (%) and mean correct length (tokens, levels {levels})")
    print(head + f"{'length':>9}{'change':>9}{'max drop':>10}{'bar':>5}{'secs':>7}")
    for name, ev in [("start", base), *results.items()]:
        x = scalar_length(ev, levels)
        change = "" if name == "start" or x is None or not x0 else f"{100 * (x / x0 - 1):+.1f}%"
        drop = max(100 * (base["accuracy"][str(lv)] - ev["accuracy"][str(lv)])
                   for lv in levels)
        ok = (name != "start" and x is not None and x0 and x <= 0.7 * x0 and drop <= 3.0)
        print(f"{name:<10}" + "".join(f"{100 * ev['accuracy'][str(lv)]:7.1f}"
                                      for lv in all_levels)
              + f"{x if x is not None else float('nan'):9.1f}{change:>9}"
              + ("" if name == "start" else f"{drop:10.1f}{'yes' if ok else 'no':>5}"
                 f"{seconds[name]:7.0f}"))
    print("secs: the method's own time (training, sampling), not its evaluation")
    print("bar: correct responses >= 30% shorter than the start's, accuracy at most 3 points "
          "below it on every trained level")

    def entry(ev):
        return {"accuracy": ev["accuracy"], "correct_length": scalar_length(ev, levels)}

    print(json.dumps({"start": entry(base),
                      "methods": {m: entry(ev) for m, ev in results.items()}}))


if __name__ == "__main__":
    main()
