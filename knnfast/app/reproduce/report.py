"""A study's report: setup, tables, the papers' claims beside what this run measured, plots.
Written as ``<study>.md`` + ``<study>.json`` (every number the markdown shows, and more).

Numbers in tables and claims come from the run's results; the only typed numbers are the
papers' own, each with the table or section it comes from (``papers.py``)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

HOLDS = "holds in miniature"
DOES_NOT_HOLD = "does not hold in miniature"
UNTESTABLE = "cannot be tested here"
VERDICTS = (HOLDS, DOES_NOT_HOLD, UNTESTABLE)


def verdict(holds: Optional[bool]) -> str:
    """HOLDS for True, DOES_NOT_HOLD for False, UNTESTABLE for None."""
    return UNTESTABLE if holds is None else HOLDS if holds else DOES_NOT_HOLD


@dataclasses.dataclass
class Claim:
    """One claim of a paper and what this run says about it.

    claim: the paper's statement. paper: its evidence (numbers with their source).
    ours: what this run measured (formatted from the results). verdict: one of VERDICTS.
    why: the reason for the verdict (and for a failure: the likely cause, e.g. scale)."""
    claim: str
    paper: str
    ours: str
    verdict: str
    why: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim: verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclasses.dataclass
class Table:
    """A table: ``rows`` are dicts keyed by ``columns``; floats print with ``digits``."""
    title: str
    columns: list[str]
    rows: list[dict[str, Any]]
    note: str = ""
    digits: int = 1

    def __post_init__(self):
        for row in self.rows:
            missing = [c for c in self.columns if c not in row]
            if missing:
                raise ValueError(f"Table {self.title!r}: row {row} lacks columns {missing}")

    def markdown(self) -> list[str]:
        def cell(v):
            if isinstance(v, float):
                return f"{v:,.{self.digits}f}"
            if isinstance(v, int) and not isinstance(v, bool):
                return f"{v:,}"
            return "–" if v is None else str(v)
        align = ["---:" if any(isinstance(r[c], (int, float)) and not isinstance(r[c], bool)
                                for r in self.rows) else "---" for c in self.columns]
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join(align) + "|"]
        out += ["| " + " | ".join(cell(r[c]) for c in self.columns) + " |" for r in self.rows]
        return out + ([""] + [self.note] if self.note else []) + [""]


class Report:
    """Collects a study's setup lines, tables, claims and plots; ``write`` renders them."""

    def __init__(self, study: str, title: str, paper: str, quick: bool):
        self.study, self.title, self.paper, self.quick = study, title, paper, quick
        self.setup: list[str] = []
        self.tables: list[Table] = []
        self.claims: list[Claim] = []
        self.plots: list[tuple[str, str]] = []
        self.results: dict[str, Any] = {}

    def table(self, title: str, columns: Sequence[str], rows: Sequence[dict], note: str = "",
              digits: int = 1) -> Table:
        t = Table(title, list(columns), [dict(r) for r in rows], note, digits)
        self.tables.append(t)
        return t

    def claim(self, claim: str, paper: str, ours: str, holds: Optional[bool], why: str) -> Claim:
        c = Claim(claim, paper, ours, verdict(holds), why)
        self.claims.append(c)
        return c

    def plot(self, filename: str, caption: str) -> None:
        self.plots.append((filename, caption))

    def markdown(self, machine: str, seconds: float, stage_seconds: Optional[dict] = None) -> str:
        shared = {k: v for k, v in (stage_seconds or {}).items() if "(shared)" in k}
        split = ("" if not shared else " (" + ", ".join(
            f"{k.replace(' (shared)', '')} {v / 60:.1f} min" for k, v in shared.items())
            + f", shared with the other studies of this scale; this study's own stages "
              f"{(seconds - sum(shared.values())) / 60:.1f} min)")
        lines = [f"# {self.title}", "", f"Paper: {self.paper}", "",
                 f"- run: `knnfast reproduce {self.study}{' --quick' if self.quick else ''}`, "
                 f"{time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min from a cold cache{split}",
                 f"- machine: {machine}"]
        lines += [f"- {s}" for s in self.setup] + ["", "## Claims", "",
                  "| claim | paper | this run | verdict | why |", "|---|---|---|---|---|"]
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines += [f"| {esc(c.claim)} | {esc(c.paper)} | {esc(c.ours)} | **{c.verdict}** | "
                  f"{esc(c.why)} |" for c in self.claims]
        lines += ["", "## Results", ""]
        for t in self.tables:
            lines += t.markdown()
        for filename, caption in self.plots:
            lines += [f"![{caption}]({filename})", ""]
        return "\n".join(lines).rstrip() + "\n"

    def to_json(self, machine: str, seconds: float, stage_seconds: dict) -> dict:
        return {"study": self.study, "title": self.title, "paper": self.paper,
                "quick": self.quick, "date": time.strftime("%Y-%m-%d %H:%M"),
                "machine": machine, "seconds": seconds, "stage_seconds": stage_seconds,
                "setup": self.setup, "claims": [dataclasses.asdict(c) for c in self.claims],
                "tables": [dataclasses.asdict(t) for t in self.tables],
                "plots": [f for f, _ in self.plots], "results": self.results}

    def write(self, out_dir: str | Path, machine: str, seconds: float,
              stage_seconds: dict) -> tuple[Path, Path]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md, js = out / f"{self.study}.md", out / f"{self.study}.json"
        md.write_text(self.markdown(machine, seconds, stage_seconds))
        js.write_text(json.dumps(self.to_json(machine, seconds, stage_seconds), indent=1,
                                 ensure_ascii=False))
        return md, js
