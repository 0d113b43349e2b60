"""Loss and metric curves of a run, as one PNG, from its metrics.jsonl.

  fusedlm plot --workdir /tmp/tiny_gpt        # -> /tmp/tiny_gpt/plots/metrics.png
  fusedlm plot --workdir DIR --out /tmp/curves.png

From Python: `plot_run("/tmp/tiny_gpt")` returns the path written.

Panels, each only when the log has its values: loss and accuracy (train and
eval on one axes), NSP loss and NSP accuracy (MLM + NSP runs), macro F1
(classification runs), learning rate, and throughput in tokens/s with MFU on a
second axis (GPU runs). Rows come from `run_logging.read_metrics`, so a step
that a resumed run logged twice is drawn once, from its last row. Drawn with
matplotlib's Agg canvas directly: no display, and no pyplot state to leak
across calls.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

from absl import flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fusedlm.research.data import partials
from fusedlm.research.runs import command_line
from fusedlm.research.runs import logger as run_logging

METRICS_FILE = "metrics.jsonl"
DEFAULT_OUT = Path("plots") / "metrics.png"
_SPLITS = ("train", "eval")
_STYLE = {"train": {"color": "tab:blue"}, "eval": {"color": "tab:orange", "marker": "o"}}


@dataclasses.dataclass(frozen=True)
class _Panel:
  title: str
  key: str
  ylabel: str
  splits: tuple[str, ...] = _SPLITS


_PANELS = (
    _Panel("loss", "loss", "loss (nats)"),
    _Panel("accuracy", "accuracy", "accuracy"),
    _Panel("NSP loss", "nsp_loss", "loss (nats)"),
    _Panel("NSP accuracy", "nsp_accuracy", "accuracy"),
    _Panel("macro F1", "macro_f1", "macro F1"),
    _Panel("learning rate", "learning_rate", "learning rate", ("train",)),
    _Panel("gradient norm", "grad_norm", "global norm", ("train",)),
    _Panel("update norm", "update_norm", "global norm", ("train",)),
    _Panel("parameter norm", "param_norm", "global norm", ("train",)),
    _Panel("throughput", "tokens_per_second", "tokens / s", ("train",)),
)


def plot_run(workdir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
  """Writes the curves of DIR/metrics.jsonl to `out` (default DIR/plots/metrics.png).

  Raises:
    FileNotFoundError: no metrics.jsonl in `workdir`.
    ValueError: a metrics.jsonl with no train or eval rows or with a line that
      is not JSON, or an `out` that does not end in .png.
  """
  workdir = Path(workdir).absolute()
  path = workdir / METRICS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"no {METRICS_FILE} at {path}: fusedlm train writes one"
                            " into its --workdir as it trains.")
  out = Path(out).absolute() if out is not None else workdir / DEFAULT_OUT
  if out.suffix.lower() != ".png":
    raise ValueError(f"the plot is a PNG; give --out a .png name, not {out.name!r}.")
  # read_metrics skips a half-written last row and names any other bad line.
  rows = {split: run_logging.read_metrics(workdir, split) for split in _SPLITS}
  if not any(rows.values()):
    raise ValueError(f"{path} has no train or eval rows to plot.")

  # The panels the log has values for.
  panels = [panel for panel in _PANELS
            if any(panel.key in row for split in panel.splits
                   for row in rows[split].values())]
  columns = 2 if len(panels) > 1 else 1
  grid_rows = -(-len(panels) // columns)
  figure = Figure(figsize=(6 * columns, 3.4 * grid_rows), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
  for ax, panel in zip(axes, panels):
    for split in panel.splits:
      steps, values = _series(rows[split], panel.key)
      if steps:
        ax.plot(steps, values, label=split, **_line_style(split, len(steps)))
    if panel.key == "tokens_per_second":
      _plot_mfu(ax, rows["train"])
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if len(panel.splits) > 1:
      ax.legend(loc="best")
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  last = max(step for split in _SPLITS for step in rows[split])
  figure.suptitle(f"{workdir.name}: {METRICS_FILE} to step {last}")
  png = io.BytesIO()
  figure.savefig(png, format="png", dpi=100)
  partials.publish(out, png.getvalue())  # a reader never sees half a picture
  return out


def _series(rows: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key`, by step, skipping rows without it."""
  points = sorted((step, row[key]) for step, row in rows.items()
                  if isinstance(row.get(key), (int, float)))
  return [step for step, _ in points], [value for _, value in points]


def _line_style(split: str, points: int) -> dict:
  style = dict(_STYLE[split])
  if points == 1:  # A lone point draws no line.
    style.setdefault("marker", "o")
  return style


def _plot_mfu(ax, train_rows: dict[int, dict]) -> None:
  """MFU (GPU runs only log it) on a second y axis of the throughput panel."""
  steps, values = _series(train_rows, "mfu")
  if not steps:
    return
  twin = ax.twinx()
  twin.plot(steps, [100 * v for v in values], color="tab:green",
            **{k: v for k, v in _line_style("train", len(steps)).items() if k != "color"})
  twin.set_ylabel("MFU (%)", color="tab:green")


def define_flags(fv: flags.FlagValues) -> None:
  f = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "run folder holding metrics.jsonl", **f)
  flags.DEFINE_string("out", None, f"PNG to write (default: WORKDIR/{DEFAULT_OUT})", **f)
  flags.mark_flags_as_required(["workdir"], flag_values=fv)


def _main(f: flags.FlagValues) -> None:
  print(plot_run(f.workdir, f.out))


def main(argv=None) -> None:
  command_line.run("fusedlm plot", define_flags, _main, argv, doc=__doc__)


if __name__ == "__main__":
  main()
