"""`earlyexit bench SPEC`: the paper's tables and figures from a spec of cells.

    spec.py     the spec (TOML): strategies, data sets, settings, tables, figures -> cells
    store.py    cell keys (configuration + model, data and code fingerprints) and the cell store
    runner.py   listing (--dry-run) and computing the cells not yet stored
    tables.py   tables in the paper's layouts: Markdown, LaTeX, CSV, JSON with provenance
    figures.py  the figures as PNG

Tables and figures are rendered from the store only, so `--render-only` is cheap and a re-run
computes only the cells whose key changed.
"""

from __future__ import annotations

import os

from earlyexit.bench import figures, tables
from earlyexit.bench.runner import describe, execute, hardware, plan
from earlyexit.bench.spec import Spec, load_spec, parse_spec
from earlyexit.bench.store import CellStore
from earlyexit.util.files import atomic_write
from earlyexit.util.provenance import provenance

__all__ = ["load_spec", "parse_spec", "Spec", "describe", "execute", "render", "plan"]


def render(spec: Spec, output: str, registry, command: str | None = None) -> list[str]:
    """Write every table (4 formats) and figure of `spec` from the store; returns the paths."""
    work = plan(spec, registry)
    store = CellStore(os.path.join(output, "cells"))
    meta = {**provenance(), "hardware": hardware(), "spec": spec.name, "spec_source": spec.source,
            "command": command}
    paths = []
    for name, table in spec.tables.items():
        rendered = tables.build(table, work.tables[name], work.cells, store, meta)
        for extension, format_table in tables.FORMATS.items():
            path = os.path.join(output, "tables", f"{name}.{extension}")
            with atomic_write(path, "w", encoding="utf-8") as handle:
                handle.write(format_table(rendered))
            paths.append(path)
    for name, figure in spec.figures.items():
        path = os.path.join(output, "figures", f"{name}.png")
        paths.append(figures.render(figure, work.tables[figure.table], store, path))
    return paths
