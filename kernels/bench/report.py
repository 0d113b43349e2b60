"""Reporting the attention benchmark: ratios, the stdout table, JSON and a chart.

Cells are the dicts of `kernels.bench.measure.measure_cell`. The ratio column
`pallas/peer` is the peer's median time over pallas's median time in the same
cell (equivalently pallas's TFLOP/s over the peer's): above 1, ours is faster.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, ScalarFormatter

from fusedlm.kernels.bench.measure import FLOP_FORMULA, MEMORY_MEASURE

RATIO_COLUMN = "pallas/peer"
_COLUMNS = (  # (header, width)
    ("N", 6), ("BxH", 7), ("implementation", 24), ("ms", 9), ("TFLOP/s", 9),
    (RATIO_COLUMN, 11), ("mem MiB", 9), ("err out", 8), ("err dq", 8),
)


def _cell_key(cell: dict) -> tuple:
  return (cell["dtype"], cell["pass"], cell["causal"], cell["head_dim"],
          cell["seq_len"], cell.get("variant", "none"))


def add_ratios(cells: list[dict]) -> None:
  """Sets cell["pallas_ratio"] = this median time / pallas's, where both ran."""
  pallas = {_cell_key(c): c for c in cells
            if c["implementation"] == "pallas" and c["status"] == "ok"}
  for cell in cells:
    ours = pallas.get(_cell_key(cell))
    ok = cell["status"] == "ok" and ours is not None
    cell["pallas_ratio"] = cell["median_ms"] / ours["median_ms"] if ok else None


def _panel_key(cell: dict) -> tuple:
  return (cell["dtype"], cell["head_dim"], cell["causal"], cell["pass"],
          cell.get("variant", "none"))


def _panel_title(key: tuple) -> str:
  dtype, head_dim, causal, pass_, variant = key
  return (f"{dtype} | head_dim {head_dim} | {'causal' if causal else 'non-causal'}"
          f" | {pass_}" + ("" if variant == "none" else f" | {variant}"))


def _number(x, fmt: str) -> str:
  return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def _row(cell: dict) -> list[str]:
  head = [str(cell["seq_len"]), f"{cell['batch']}x{cell['num_heads']}",
          cell["label"]]
  if cell["status"] != "ok":
    return head + [f"{cell['status']}: {short_reason(cell['reason'])}"]
  memory = (cell.get("memory_bytes") or {}).get("total")
  error = cell.get("error") or {}
  return head + [
      _number(cell["median_ms"], ".4g"),
      _number(cell["tflops"], ".4g"),
      _number(cell["pallas_ratio"], ".2f"),
      _number(None if memory is None else memory / 2**20, ".1f"),
      _number(error.get("out"), ".1e"),
      _number(error.get("dq"), ".1e"),
  ] + ([f"error not measured: {error['reason']}"] if "reason" in error else [])


def short_reason(reason: str, width: int = 60) -> str:
  """A cell's failure in a few words for the table (the JSON keeps it whole):
  the message's first clause, without the exception's type."""
  text = re.sub(r"^\w+(Error|Exception): ", "", reason.strip())
  text = re.split(r"; |\. |: ", text, maxsplit=1)[0].rstrip(".")
  return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def _format_row(fields: list[str]) -> str:
  padded = [f.rjust(w) if i != 2 else f.ljust(w)
            for i, (f, (_, w)) in enumerate(zip(fields, _COLUMNS))]
  return "  ".join(padded + fields[len(_COLUMNS):]).rstrip()


def format_table(cells: list[dict], meta: dict) -> str:
  """The stdout table: one block per (dtype, head dim, causal, pass)."""
  lines = [
      f"Attention benchmark on {meta['device_kind']} ({meta['platform']}),"
      f" JAX {meta['jax_version']}, {meta['date']}",
      f"TFLOP/s from FLOPs: {FLOP_FORMULA}.",
      f"ms: median per call; {RATIO_COLUMN}: peer time / pallas time"
      " (> 1: pallas faster).",
      f"mem: {MEMORY_MEASURE}.",
      "err: ||out - ref|| / ||ref|| vs the float32 reference (dq likewise).",
  ]
  if meta["platform"] != "gpu":
    lines.append("Not a GPU: Pallas kernels run in the interpreter; the times"
                 " test the path, they do not measure performance.")
  header = _format_row([name for name, _ in _COLUMNS])
  for key, group in itertools.groupby(sorted(cells, key=_panel_key), _panel_key):
    lines += ["", f"== {_panel_title(key)} ==", header]
    lines += [_format_row(_row(c)) for c in group]
  return "\n".join(lines)


def write_json(path, meta: dict, cells: list[dict]) -> None:
  """Writes the file whole or not at all (a temporary file, then a rename):
  a kill mid-write leaves the previous version."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump({"meta": meta, "cells": cells}, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def plot(path, cells: list[dict], meta: dict) -> None:
  """TFLOP/s against N, one line per implementation, one panel per setting."""
  rows = sorted({(c["dtype"], c["head_dim"]) for c in cells})
  cols = sorted({(c["causal"], c["pass"], c.get("variant", "none")) for c in cells})
  # A bare Figure on the Agg canvas: no pyplot state, no display needed.
  fig = Figure(figsize=(4.2 * len(cols), 3.4 * len(rows)))
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(rows), len(cols), squeeze=False)
  for (i, row), (j, col) in itertools.product(enumerate(rows), enumerate(cols)):
    ax = axes[i][j]
    panel = [c for c in cells if (c["dtype"], c["head_dim"]) == row
             and (c["causal"], c["pass"], c.get("variant", "none")) == col
             and c["status"] == "ok"]
    for name in dict.fromkeys(c["label"] for c in cells):
      line = sorted((c["seq_len"], c["tflops"]) for c in panel
                    if c["label"] == name)
      if line:
        ax.plot(*zip(*line), marker="o", label=name)
    ax.set_title(_panel_title(row + col), fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({c["seq_len"] for c in cells}))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("TFLOP/s")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=7)
  title = f"Attention, {meta['device_kind']}, JAX {meta['jax_version']}"
  if meta["platform"] != "gpu":
    title += " (interpreter smoke, not performance)"
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
