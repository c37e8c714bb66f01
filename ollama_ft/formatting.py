"""Plain-text formatting shared by the library and the CLI: byte sizes and Markdown tables.

    from ollama_ft.formatting import format_bytes, markdown_table
    format_bytes(3 * 2**30)                               # "3.0 GiB"
    markdown_table(["type", "size"], [["q4_k_m", "2.4"]])  # ["| type | size |", "|---|---|", "| q4_k_m | 2.4 |"]

No rich here: the terminal's tables are drawn in ollama_ft/console.py, from the same rows.
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB")


def format_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit up to GiB that keeps it at or above 1: "512 B", "15.9 MiB"."""
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS):
        n, unit = n / 1024, unit + 1
    return f"{int(n)} B" if unit == 0 else f"{n:.1f} {_UNITS[unit - 1]}"


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: the header, its separator and one line per row."""
    return (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            + ["| " + " | ".join(row) + " |" for row in rows])
