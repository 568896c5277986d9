"""Markdown tables of the registries, for the README.

    python -m altlearn.docs            # print the tables
    python -m altlearn.docs README.md  # rewrite the block between the registry markers

A test checks that the README holds exactly what this prints, so the README cannot drift from
the registries.
"""

from __future__ import annotations

import sys
from pathlib import Path

from altlearn import data, models, rules

START, END = "<!-- registry:start -->", "<!-- registry:end -->"


def _first_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0].rstrip(".")


def registry_tables() -> str:
    lines = ["### Rules", "", "| rule | what it does | needs layers | source | options |"]
    lines.append("|---|---|---|---|---|")
    for name, spec in rules.RULES.items():
        options = ", ".join(f"`{k}`" for k in rules.rule_options(spec)) or "-"
        layered = "yes" if spec.needs_layered else "no"
        lines.append(f"| `{name}` | {spec.summary} | {layered} | {spec.source} | {options} |")
    lines += [
        "",
        "### Models",
        "",
        "| model | what it is | layered | options |",
        "|---|---|---|---|",
    ]
    for name, factory in models.MODELS.items():
        options = ", ".join(f"`{k}`" for k in models.model_options(name))
        returns = str(factory.__annotations__.get("return", ""))
        layered = "yes" if "LayeredModel" in returns else "no (forward only)"
        lines.append(f"| `{name}` | {_first_line(factory)} | {layered} | {options} |")
    lines += [
        "",
        "### Datasets",
        "",
        "| dataset | what it is | kind | files needed |",
        "|---|---|---|---|",
    ]
    for name, info in data.DATASETS.items():
        files = (
            "yes: put them in `data/` or `--config.data.data_dir`" if info.needs_data_dir else "no"
        )
        lines.append(f"| `{name}` | {info.description} | {info.kind} | {files} |")
    lines.append(
        "| `csv:<path>` | your own table: header row, last column is the target | tabular | "
        "the CSV file |"
    )
    return "\n".join(lines)


def render_into(text: str) -> str:
    """``text`` with the block between the registry markers replaced by the current tables."""
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{registry_tables()}\n{END}{tail}"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        path = Path(argv[1])
        path.write_text(render_into(path.read_text()))
    else:
        print(registry_tables())


if __name__ == "__main__":
    main(sys.argv)
