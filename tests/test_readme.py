"""The README is the front door: set-up, then a quick start within its first 60 lines, then the reference
sections in the order a newcomer needs them; the long material lives in docs/, each page linked and present."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
LINES = README.splitlines()


def _heading(title: str) -> int:
    return next(i for i, line in enumerate(LINES) if line.strip() == f"## {title}")


def test_set_up_then_quick_start_within_60_lines() -> None:
    setup = README.split("```bash", 1)[1].split("```", 1)[0]  # the first command block: the two set-up commands
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()] == ["make run", "make test"]
    quick, after = _heading("Quick start"), _heading("Command line")
    assert README.index(setup) < README.index("## Quick start") and quick < after <= 60, (quick, after)
    block = "\n".join(LINES[quick:after])
    for what in ("lungxray predict", "report.md", "lungxray serve"):  # predict one image, open the report, the page
        assert what in block, what


def test_reference_sections_in_order() -> None:
    headings = [line[3:].strip() for line in LINES if line.startswith("## ")]
    order = ["Quick start", "Command line", "Python API", "Web service", "Using a model at another hospital",
             "Configuration", "Performance", "Training on several processes or machines (torchrun)"]
    where = [headings.index(t) for t in order]
    assert where == sorted(where), dict(zip(order, where, strict=True))
    assert headings.index("Using a model at another hospital") == headings.index("Web service") + 1


def test_long_material_lives_in_docs_and_every_link_resolves() -> None:
    for title in ("Choosing the reference", "Study", "Robustness to source shift"):
        assert f"\n## {title}\n" not in README, f"{title} belongs in docs/"
    assert "| gamma_dark |" not in README and "| candidate |" not in README  # shift and selection tables moved
    links = set(re.findall(r"\]\((docs/[^)#]+)", README))
    assert {"docs/study.md", "docs/selection.md", "docs/robustness.md", "docs/performance.md",
            "docs/site-adaptation.md"} <= links
    for link in links - {"docs/site-adaptation.md"}:  # the site-adaptation page is written by its own issue
        assert (ROOT / link).is_file(), link


def test_no_unqualified_machine_claims() -> None:
    """Timings name their machine: no 'trains in N minutes' without a CPU beside it."""
    for n, line in enumerate(LINES):
        if re.search(r"\b\d+(\.\d+)? (minutes|min|ms|s)\b", line) and "|" not in line:
            window = " ".join(LINES[max(0, n - 3):n + 3])
            assert re.search(r"EPYC|Sapphire Rapids|Intel|AMD|H200", window), (n + 1, line)
