"""Write (or check) the argument tables of ``docs/configuration.md`` from the model's and the groups' docstrings.

The tables stand between ``<!-- tables: begin -->`` and ``<!-- tables: end -->``; the rest of the page is written
by hand. ``python docs/configuration_tables.py`` rewrites them; ``--check`` exits 1 when the page is out of date
(``tests/test_config.py`` runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

from docstring_parser import parse

from anomalib_anomalyclip import AnomalyCLIP
from anomalib_anomalyclip.config import GROUPS

PAGE = Path(__file__).with_name("configuration.md")
BEGIN, END = "<!-- tables: begin -->", "<!-- tables: end -->"
COMPONENTS = ("pre_processor", "post_processor", "evaluator", "visualizer")


def _cell(text: str) -> str:
    """One table cell: reST roles and double backticks as Markdown code, on one line."""
    text = re.sub(r":(?:mod|class|func|meth|attr):`~?([^`]+)`", r"`\1`", " ".join(text.split()))
    return text.replace("``", "`").replace("|", "\\|")


def _default(value: object) -> str:
    if dataclasses.is_dataclass(value):
        return "(group)"
    return f"`{value!r}`" if value is not None else "`None`"


def _table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| argument | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {default} | {_cell(meaning)} |" for name, default, meaning in rows]
    return "\n".join(lines)


def tables() -> str:
    """The model's plain arguments, then one table per group, each from its docstring."""
    meanings = {param.arg_name: param.description or "" for param in parse(AnomalyCLIP.__doc__ or "").params}
    parameters = inspect.signature(AnomalyCLIP.__init__).parameters
    plain = [
        (name, _default(parameter.default), meanings.get(name, ""))
        for name, parameter in parameters.items()
        if name != "self" and name not in GROUPS and name not in COMPONENTS
    ]
    sections = ["### The model's own arguments", "", _table(plain)]
    for name, group in GROUPS.items():
        docstring = parse(group.__doc__ or "")
        fields = {field.name: field for field in dataclasses.fields(group)}
        rows = [
            (f"{name}.{param.arg_name}", _default(_field_default(fields[param.arg_name])), param.description or "")
            for param in docstring.params
        ]
        sections += ["", f"### `{name}`: {_cell(docstring.short_description or '')}", "", _table(rows)]
    return "\n".join(sections)


def _field_default(field: dataclasses.Field) -> object:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def main() -> int:
    """Rewrite the tables, or with ``--check`` say whether they are up to date."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the page is out of date")
    check = parser.parse_args().check
    text = PAGE.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    updated = f"{text[:start]}\n{tables()}\n{text[end:]}"
    if check:
        if updated != text:
            print(f"{PAGE} is out of date: run python docs/configuration_tables.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
