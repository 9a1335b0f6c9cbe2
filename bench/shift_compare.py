"""Side-by-side shift-benchmark table of two runs (e.g. the reference before and after the robustness work).

    python bench/shift_compare.py BEFORE/robustness/robustness.json AFTER/robustness/robustness.json \
        [--names before after]

Prints Markdown: macro F1 % per shift and severity as "before → after", each shift's mean, the clean scores,
the mean under shift and the held-out mean. Both files must come from the same split and images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def compare(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str]) -> list[str]:
    if (before["split"], before["images"]) != (after["split"], after["images"]):
        raise SystemExit("the two benchmarks were not run on the same split and images")
    cells = {(r, c["shift"], c["level"]): c["macro_f1"] for r, res in (("b", before), ("a", after))
             for c in res["cells"]}
    levels = max(c["level"] for c in before["cells"])
    a, b = names
    lines = [f"Macro F1 % on {before['images']} {before['split']} images, {a} → {b}.", "",
             "| shift | simulated by | " + " | ".join(f"sev {i}" for i in range(1, levels + 1)) + " | mean |",
             "|---|---|" + "---|" * (levels + 1)]
    for name, info in before["summary"]["per_shift"].items():
        row = []
        for i in range(1, levels + 1):
            if ("b", name, i) in cells and ("a", name, i) in cells:
                row.append(f"{100 * cells['b', name, i]:.0f} → {100 * cells['a', name, i]:.0f}")
            else:
                row.append("–")
        mean_after = after["summary"]["per_shift"][name]["macro_f1"]
        lines.append(f"| {name} | {info['simulated_by'] or 'held out'} | " + " | ".join(row)
                     + f" | {100 * info['macro_f1']:.0f} → **{100 * mean_after:.0f}** |")
    sb, sa = before["summary"], after["summary"]
    lines += ["", "| | " + a + " | " + b + " |", "|---|---|---|",
              f"| clean accuracy | {before['clean']['accuracy']:.3f} | {after['clean']['accuracy']:.3f} |",
              f"| clean macro F1 | {before['clean']['macro_f1']:.3f} | {after['clean']['macro_f1']:.3f} |",
              f"| **mean under shift (macro F1)** | **{sb['mean_macro_f1']:.3f}** | **{sa['mean_macro_f1']:.3f}** |",
              f"| held-out shifts (macro F1) | {sb['held_out_macro_f1']:.3f} | {sa['held_out_macro_f1']:.3f} |"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--names", nargs=2, default=("before", "after"))
    args = parser.parse_args()
    print("\n".join(compare(_load(args.before), _load(args.after), tuple(args.names))))


if __name__ == "__main__":
    main()
