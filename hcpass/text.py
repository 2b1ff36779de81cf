"""Plain-text helpers shared by the core, the tools and the benchmarks: aligned tables
(`table`) and names made unique by a counter (`unique_name`)."""

from __future__ import annotations

from collections.abc import Container, Sequence

GAP = "  "  # between columns


def table(
    rows: Sequence[Sequence[object]],
    header: Sequence[str] | None = None,
    align: str = "",
) -> str:
    """`rows` as text columns two spaces apart; cells are formatted with `str`.

    `align` has one character per column, ``<`` (left, the default for columns it does not
    cover) or ``>`` (right). A `header` gets a rule of dashes under it. A left-aligned last
    column is free text (a reason, a description): it is not padded, and its rule is as
    wide as its heading.
    """
    cells = [[str(c) for c in row] for row in ([header] if header else []) + list(rows)]
    if not cells:
        return ""
    columns = len(cells[0])
    align = align.ljust(columns, "<")
    widths = [max(len(row[i]) for row in cells) for i in range(columns)]
    if header and align[-1] == "<":
        # the free-text last column: its rule follows the heading, not the longest cell
        widths_of_rule = [*widths[:-1], len(header[-1])]
    else:
        widths_of_rule = widths
    lines = [_line(row, widths, align) for row in cells]
    if header:
        lines.insert(1, _line(["-" * w for w in widths_of_rule], widths, align))
    return "\n".join(lines)


def _line(row: Sequence[str], widths: Sequence[int], align: str) -> str:
    padded = [
        cell.rjust(width) if side == ">" else cell.ljust(width)
        for cell, width, side in zip(row, widths, align, strict=True)
    ]
    if align[-1] == "<":
        padded[-1] = row[-1]
    return GAP.join(padded)


def unique_name(name: str, taken: Container[str], separator: str = "_") -> str:
    """`name` if it is not `taken`, else the first free of ``name<separator>2``, ``...3``."""
    candidate, count = name, 1
    while candidate in taken:
        count += 1
        candidate = f"{name}{separator}{count}"
    return candidate
