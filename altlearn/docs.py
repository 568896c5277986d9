"""Documents generated from the registries: the README's tables and docs/RULES.md.

    python -m altlearn.docs                        # print the README's tables
    python -m altlearn.docs README.md              # rewrite the block between the markers
    python -m altlearn.docs --rules docs/RULES.md  # rewrite the rules' specification
    python -m altlearn.docs --tables docs/RESULTS.md  # copy the result tables in again

docs/RULES.md is each registered rule's module docstring (its specification: equations, paper,
the decisions taken where the paper is silent), its factory's docstring (the options) and its
registry entry, in registry order. Tests check that both files hold exactly what this writes,
so neither can drift from the code.

Result tables: a table in a document that comes from an output file (a binary's ``NAME.md``,
written by ``altlearn.report`` beside ``NAME.json`` with its command, commit and machine) sits
between ``<!-- table: PATH#K -->`` and ``<!-- end table -->``: the K-th table (1 when ``#K`` is
left out) of the repository file PATH, a table being a run of lines that start with ``|``.
``--tables`` copies each table in again; a test fails when a table and its file disagree.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

from altlearn import data, models, rules

START, END = "<!-- registry:start -->", "<!-- registry:end -->"
ROOT = Path(__file__).resolve().parents[1]
TABLE = re.compile(
    r"<!-- table: (?P<path>[^#\s]+)(?:#(?P<k>\d+))? -->\n(?P<body>.*?)<!-- end table -->\n", re.S
)


def tables_of(text: str) -> list[str]:
    """The markdown tables of ``text``: each run of lines starting with ``|``, newline-ended."""
    out, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append("\n".join(current) + "\n")
            current = []
    if current:
        out.append("\n".join(current) + "\n")
    return out


def source_table(path: str, k: int = 1) -> str:
    """Table ``k`` (from 1) of the repository file ``path``; a clear error if there is none."""
    file = ROOT / path
    if not file.is_file():
        raise ValueError(f"table source {path} does not exist")
    found = tables_of(file.read_text())
    if not 1 <= k <= len(found):
        raise ValueError(f"{path} has {len(found)} table(s); table {k} was asked for")
    return found[k - 1]


def render_tables(text: str) -> str:
    """``text`` with every sourced table block replaced by the table its file holds now."""

    def fill(m: re.Match) -> str:
        k = int(m["k"] or 1)
        ref = m["path"] + (f"#{m['k']}" if m["k"] else "")
        return f"<!-- table: {ref} -->\n{source_table(m['path'], k)}<!-- end table -->\n"

    return TABLE.sub(fill, text)


def table_drift(text: str) -> list[str]:
    """The sourced tables of ``text`` that differ from their files: one line each."""
    out = []
    for m in TABLE.finditer(text):
        expected = source_table(m["path"], int(m["k"] or 1))
        if m["body"] != expected:
            line = text[: m.start()].count("\n") + 1
            out.append(f"line {line}: the table differs from {m['path']}#{m['k'] or 1}")
    return out


def unsourced_tables(text: str) -> list[int]:
    """First lines of the tables of ``text`` that hold measured numbers (a decimal such as 0.97
    or 1.2x) outside every sourced-table and registry block: numbers no output file backs."""
    spans = [m.span() for m in TABLE.finditer(text)]
    spans += [m.span() for m in re.finditer(f"{re.escape(START)}.*?{re.escape(END)}", text, re.S)]
    out, table, offset = [], [], 0  # table: (line number, text) of the current run of | lines
    for number, line in enumerate(text.splitlines(keepends=True) + [""], start=1):
        if line.startswith("|") and not any(a <= offset < b for a, b in spans):
            table.append((number, line))
        elif table:
            if any(re.search(r"\d\.\d", row) for _, row in table):
                out.append(table[0][0])
            table = []
        offset += len(line)
    return out


def _first_line(obj) -> str:
    return (obj.__doc__ or "").strip().splitlines()[0].rstrip(".")


def registry_tables() -> str:
    lines = ["### Rules", "", "| rule | what it does | needs layers | source | options |"]
    lines.append("|---|---|---|---|---|")
    for name, spec in rules.RULES.items():
        options = ", ".join(f"`{k}`" for k in rules.options_of(name)) or "-"
        layered = "yes" if "layered" in spec.needs else "no"
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


RULES_INTRO = """# The learning rules

Generated from the code by `python -m altlearn.docs --rules docs/RULES.md`: each rule's module
docstring (what it computes, the paper it comes from, and the decisions we took where the paper
is silent, with the measurements behind them), its options and its registry entry. A test fails
if this file drifts from the code.

Notation: a network of L layers; layer l takes the input z_{l-1} (the previous layer's output
h_{l-1} after flattening or pooling and, on a decorrelated model, the matrix R_l; h_0 = x),
computes the pre-activation a_l = layer_l(params_l, z_{l-1}) and h_l = f(a_l); the last layer
has no f. B is the batch size; l_n the loss of sample n; the batch loss is their mean. Costs
are in forward-pass equivalents over the step's batch (a backward or jvp pass counts 2).

| rule | module | source | needs layers | data splits |
|---|---|---|---|---|
"""


def _doc(obj) -> str:
    return textwrap.dedent(inspect.getdoc(obj) or "").strip()


def _code(text: str) -> str:
    """Indented blocks (equations) of a docstring as fenced code, so markdown keeps them."""
    out, block = [], []
    for line in text.splitlines():
        if line.startswith("    ") and (block or not out or not out[-1].strip()):
            block.append(line[4:])
            continue
        if block:
            out += ["```", *block, "```"]
            block = []
        out.append(line)
    if block:
        out += ["```", *block, "```"]
    return "\n".join(out)


def rules_document() -> str:
    """docs/RULES.md: the specification of every registered rule."""
    lines = [RULES_INTRO.rstrip("\n")]
    for name, spec in rules.RULES.items():
        module = spec.factory.__module__
        layered = "yes" if "layered" in spec.needs else "no"
        splits = ", ".join(s for s in spec.needs if s in rules.SPLITS) or "-"
        lines.append(f"| [`{name}`](#{name}) | `{module}` | {spec.source} | {layered} | {splits} |")
    for name, spec in rules.RULES.items():
        module = importlib.import_module(spec.factory.__module__)
        options = rules.options_of(name)
        lines += ["", f"## {name}", "", _code(_doc(module)), "", "### Options", ""]
        lines += ["| option | default |", "|---|---|"]
        lines += [f"| `{k}` | `{v!r}` |" for k, v in options.items()] or ["| - | - |"]
        lines += ["", _code(_doc(spec.factory)), "", "### Cost per step", "", _doc(spec.cost)]
        searched = ", ".join(f"`{s}`" for s in spec.search) or "none (the learning rate alone)"
        lines += ["", "### Tuned by the leaderboard", "", f"Main option: {searched}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if len(argv) > 2 and argv[1] == "--rules":
        Path(argv[2]).write_text(rules_document())
    elif len(argv) > 2 and argv[1] == "--tables":
        for name in argv[2:]:
            path = Path(name)
            path.write_text(render_tables(path.read_text()))
    elif len(argv) > 1:
        path = Path(argv[1])
        path.write_text(render_into(path.read_text()))
    else:
        print(registry_tables())


if __name__ == "__main__":
    main(sys.argv)
