"""Choose a recipe on out-of-bag figures only: train candidates over several seeds, rank, apply a stated rule.

Every candidate is the base config plus `--set` overrides, trained once per seed (runs in parallel, each a real
`lungxray train` process, logs kept beside the runs). Stage 1 ranks candidates by mean out-of-bag (OOB) accuracy;
stage 2 runs the shift benchmark on OOB images (`lungxray robustness --split validation --levels 1 3 5`) for the
incumbent (the first candidate) and the best challengers. Test figures stay in the run folders: this script never
reads or prints them, so the choice cannot lean on the test split.

The rule (stated before the runs, printed with the table): a challenger replaces the incumbent when its mean OOB
accuracy is at least `--min-gain` higher and its mean OOB macro F1 under shift is no more than `--max-shift-drop`
lower; among several, the highest mean OOB accuracy wins. `--reveal-test` appends each run's test accuracy
after the choice has been written, for the record; nothing reads it back.

    python bench/select_oob.py --data DIR --out runs/select --device cuda --jobs 4 --seeds 0 1 2 \\
        --candidate ref --candidate k20:ensemble.members=20 --candidate ls:train.label_smoothing=0.1
Re-running with the same --out reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_candidate(spec: str) -> tuple[str, list[str]]:
    """'k20:ensemble.members=20,train.epochs=40' -> ('k20', ['ensemble.members=20', 'train.epochs=40'])."""
    name, _, sets = spec.partition(":")
    return name, [s for s in sets.split(",") if s]


def lungxray(args: list[str], log: Path, threads: int) -> int:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads)}
    with log.open("w") as f:
        return subprocess.call([sys.executable, "-m", "lungxray", *args], stdout=f, stderr=subprocess.STDOUT, env=env)


def train_one(a: argparse.Namespace, name: str, sets: list[str], seed: int) -> dict:
    run = a.out / f"{name}_s{seed}"
    if not (run / "metrics.json").exists():
        cmd = ["train", "--config", a.config, "--data", a.data, "--out", str(run), "--device", a.device,
               "--set", f"seed={seed}", "--set", f"train.threads={a.threads}"]
        for s in [*a.base_sets, *sets]:
            cmd += ["--set", s]
        if lungxray(cmd, a.out / f"{name}_s{seed}.log", a.threads) != 0:
            return {"candidate": name, "seed": seed, "error": f"training failed, see {run}.log"}
    m = json.loads((run / "metrics.json").read_text())
    oob = m["validation"]["metrics"]
    return {"candidate": name, "seed": seed, "run": str(run), "oob_accuracy": oob["accuracy"],
            "oob_macro_f1": oob["macro_f1"], "oob_nll": oob["nll"], "train_seconds": m["timing"]["train_seconds"]}


def shift_one(a: argparse.Namespace, run: str) -> dict:
    out = Path(run) / "robustness_val135"
    if not (out / "robustness.json").exists():
        lungxray(["robustness", run, "--split", "validation", "--levels", "1", "3", "5", "--no-saliency",
                  "--device", a.device, "--out", str(out)], Path(run + ".rob_val135.log"), a.threads)
    if not (out / "robustness.json").exists():
        return {"run": run, "error": "shift benchmark failed"}
    s = json.loads((out / "robustness.json").read_text())["summary"]
    return {"run": run, "shift_mean": s["mean_macro_f1"], "shift_held_out": s["held_out_macro_f1"]}


def mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.fmean(vals) if vals else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/reference.yaml"))
    p.add_argument("--data", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", dest="base_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every candidate (e.g. a shorter schedule for a quick look)")
    p.add_argument("--candidate", action="append", required=True,
                   help="NAME[:key=value,...]; the first is the incumbent")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 4))
    p.add_argument("--shift-top", type=int, default=2, help="challengers (by OOB accuracy) to shift-benchmark")
    p.add_argument("--min-gain", type=float, default=0.005)
    p.add_argument("--max-shift-drop", type=float, default=0.01)
    p.add_argument("--reveal-test", action="store_true",
                   help="after the choice is written, append each run's test accuracy (for the record)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    cands = [parse_candidate(c) for c in a.candidate]
    incumbent = cands[0][0]

    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda job: train_one(a, *job), [(n, s, seed) for n, s in cands for seed in a.seeds]))
    by = {n: [r for r in rows if r["candidate"] == n] for n, _ in cands}
    summary = {n: {"sets": s, "oob_accuracy": mean(by[n], "oob_accuracy"), "oob_macro_f1": mean(by[n], "oob_macro_f1"),
                   "oob_nll": mean(by[n], "oob_nll"), "train_seconds": mean(by[n], "train_seconds"),
                   "per_seed": [round(r.get("oob_accuracy", float("nan")), 3) for r in by[n]],
                   "errors": [r["error"] for r in by[n] if "error" in r]} for n, s in cands}
    ranked = sorted((n for n in summary if n != incumbent and summary[n]["oob_accuracy"] is not None),
                    key=lambda n: -summary[n]["oob_accuracy"])
    to_shift = [incumbent, *ranked[: a.shift_top]]
    with ThreadPoolExecutor(a.jobs) as pool:
        runs = [r["run"] for n in to_shift for r in by[n] if "run" in r]
        shifts = list(pool.map(lambda run: shift_one(a, run), runs))
    for n in to_shift:
        mine = [s for s in shifts if Path(s["run"]).name.rsplit("_s", 1)[0] == n]
        summary[n]["shift_mean"] = mean(mine, "shift_mean")
        summary[n]["shift_held_out"] = mean(mine, "shift_held_out")

    inc = summary[incumbent]
    winners = [n for n in ranked if summary[n].get("shift_mean") is not None and inc["oob_accuracy"] is not None
               and summary[n]["oob_accuracy"] >= inc["oob_accuracy"] + a.min_gain
               and summary[n]["shift_mean"] >= inc["shift_mean"] - a.max_shift_drop]
    choice = winners[0] if winners else incumbent
    lines = [f"Rule: a challenger replaces `{incumbent}` if its mean OOB accuracy over seeds {a.seeds} is >= "
             f"{a.min_gain} higher and its OOB shift mean (severities 1, 3, 5) is at most {a.max_shift_drop} lower; "
             "highest OOB accuracy among those. Test figures not read.", "",
             "| candidate | overrides | OOB accuracy per seed | mean | OOB macro F1 | OOB NLL | OOB shift mean | "
             "held-out shifts | train s |", "|---|---|---|---|---|---|---|---|---|"]

    def fmt(v: float | None, d: int = 3) -> str:
        return "–" if v is None else f"{v:.{d}f}"

    for n in [incumbent, *ranked]:
        s = summary[n]
        lines.append(f"| {n} | {' '.join(s['sets']) or '(base)'} | {' / '.join(map(str, s['per_seed']))} | "
                     f"{fmt(s['oob_accuracy'])} | {fmt(s['oob_macro_f1'])} | {fmt(s['oob_nll'])} | "
                     f"{fmt(s.get('shift_mean'))} | {fmt(s.get('shift_held_out'))} | {fmt(s['train_seconds'], 0)} |")
    lines += ["", f"Choice: **{choice}**" + ("" if choice != incumbent else " (the incumbent stays)")]
    text = "\n".join(lines)
    print(text)
    (a.out / "selection.md").write_text(text + "\n")
    record = {"choice": choice, "summary": summary, "rule": lines[0]}
    (a.out / "selection.json").write_text(json.dumps(record, indent=1))
    if a.reveal_test:  # only now, with the choice on disk
        record["test_after_choice"] = reveal_test(a.out, by)
        (a.out / "selection.json").write_text(json.dumps(record, indent=1))
    return 0


def reveal_test(out: Path, by: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Each run's test count (correct/total), printed and appended to selection.md below the choice."""
    found = {}
    for name, rows in by.items():
        counts = []
        for r in rows:
            if "run" in r:
                t = json.loads((Path(r["run"]) / "metrics.json").read_text())["test"]["metrics"]
                counts.append(f"{round(t['accuracy'] * t['n'])}/{t['n']}")
        found[name] = counts
    lines = ["", "Test figures, read after the choice above was written (not used by it):", ""]
    lines += [f"- {name}: {' / '.join(c) or '–'}" for name, c in found.items()]
    print("\n".join(lines))
    with (out / "selection.md").open("a") as f:
        f.write("\n".join(lines) + "\n")
    return found


if __name__ == "__main__":
    sys.exit(main())
