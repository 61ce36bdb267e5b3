"""A study's report: a table of its trials and plots (PNG to look at, HTML to explore).

Plots: optimization history, intermediate values (what pruning saw), parameter importances,
parallel coordinates, each objective against every searched option (learning rate included)
and against model size, and the Pareto front when there are several objectives.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps.spec import SweepSpec
from sweeps.study import retried_trial_number

log = logging.getLogger(__name__)


def trial_rows(study: optuna.Study, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial: number, state, the trial it retries, values, parameters, size, time and why it failed."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    retries = {t.number: retried_trial_number(t) for t in trials}
    for trial in trials:
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name.lower()}
        if any(n is not None for n in retries.values()):  # a dead worker's trial, run again as this one
            row["retry_of"] = retries[trial.number]
        values = trial.values or [None] * len(spec.objectives)
        for objective, value in zip(spec.objectives, values):
            row[objective.metric] = value
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            row[spec.objectives[0].metric] = trial.intermediate_values[step]
        row.update(trial.params)
        row["n_parameters"] = trial.user_attrs.get("n_parameters")
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        row["seconds"] = seconds
        row["steps"] = max(trial.intermediate_values) if trial.intermediate_values else None
        row["note"] = trial.user_attrs.get("fail_reason", "")
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], title: str, best: set[int]) -> str:
    """The trial table, as rich draws it (plain text under a pipe); best trials marked with *."""
    from rich.console import Console
    from rich.table import Table

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column not in ("state", "note") else "left")
    for row in rows:
        cells = [_cell(row.get(column)) for column in columns]
        cells[0] = f"{cells[0]}{' *' if row['trial'] in best else ''}"
        table.add_row(*cells)
    console = Console(width=200)
    with console.capture() as captured:
        console.print(table)
    text = captured.get()
    print(text, end="")
    return text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def write_plots(study: optuna.Study, spec: SweepSpec, out: Path) -> list[Path]:
    """Every plot that the study's trials can support, as ``NAME.png`` and ``NAME.html``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    out.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    names = [o.metric for o in spec.objectives]
    written: list[Path] = []
    plots: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
    if len(names) == 1:
        plots += [("optimization_history", "plot_optimization_history", {}),
                  ("intermediate_values", "plot_intermediate_values", {}),
                  ("param_importances", "plot_param_importances", {}),
                  ("parallel_coordinate", "plot_parallel_coordinate", {}),
                  ("slice", "plot_slice", {})]
    else:
        plots.append(("pareto_front", "plot_pareto_front", {"target_names": names}))
        for index, name in enumerate(names):
            target = {"target": (lambda t, i=index: t.values[i]), "target_name": name}
            slug = _slug(name)
            plots += [(f"param_importances_{slug}", "plot_param_importances", target),
                      (f"slice_{slug}", "plot_slice", target)]
    if len(complete) < 2:
        plots = [p for p in plots if p[1] not in ("plot_param_importances",)]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials" and the like: the table says it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for stem, function, kwargs in plots:
            try:
                figure = getattr(interactive, function)(study, **kwargs)
                figure.write_html(out / f"{stem}.html", include_plotlyjs="directory")
                written.append(out / f"{stem}.html")
                axes = getattr(static, function)(study, **kwargs)
                _save(plt, axes, out / f"{stem}.png")
                written.append(out / f"{stem}.png")
            except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as err:
                log.info(f"plot {stem} skipped: {err}")
            finally:
                plt.close("all")
        written += _size_plots(study, spec, out, plt)
    optuna.logging.set_verbosity(verbosity)
    return written


def _save(plt: Any, axes: Any, path: Path) -> None:
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    panels = sum(1 for axis in figure.axes if axis.get_label() != "<colorbar>")
    width, height = figure.get_size_inches()
    # Room for every panel (a slice plot has one per parameter) and its colour bar; no tight_layout,
    # which would push Optuna's colour bar over the last panel.
    figure.set_size_inches(max(width, 8, 5 * panels + 2), max(height, 5))
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _size_plots(study: optuna.Study, spec: SweepSpec, out: Path, plt: Any) -> list[Path]:
    """Each objective against model size (parameters): complete trials, and pruned ones at their last report."""
    import plotly.graph_objects as go

    written = []
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("n_parameters")]
    for index, objective in enumerate(spec.objectives):
        if objective.metric == "n_parameters":
            continue
        points: dict[str, list[tuple[float, float, int]]] = {"complete": [], "pruned": []}
        for trial in trials:
            value = _value(trial, index)
            if value is not None:
                points["complete" if trial.state == TrialState.COMPLETE else "pruned"].append(
                    (trial.user_attrs["n_parameters"], value, trial.number))
        if not any(points.values()):
            continue
        slug = _slug(objective.metric)
        figure, axis = plt.subplots(figsize=(8, 5))
        figure_html = go.Figure()
        for label, marker in (("complete", "o"), ("pruned", "x")):
            if points[label]:
                xs, ys, numbers = zip(*points[label])
                axis.scatter(xs, ys, marker=marker, label=f"{label} ({len(xs)})", alpha=0.8)
                figure_html.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name=label,
                                                 text=[f"trial {n}" for n in numbers]))
        axis.set_xscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel(objective.metric + (" (pruned: last reported)" if points["pruned"] else ""))
        axis.set_title(f"{study.study_name}: {objective.metric} against model size")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(out / f"{slug}_vs_size.png", dpi=110)
        plt.close(figure)
        figure_html.update_layout(title=f"{study.study_name}: {objective.metric} against model size",
                                  xaxis={"title": "parameters", "type": "log"}, yaxis={"title": objective.metric})
        figure_html.write_html(out / f"{slug}_vs_size.html", include_plotlyjs="directory")
        written += [out / f"{slug}_vs_size.png", out / f"{slug}_vs_size.html"]
    return written


def _value(trial: FrozenTrial, index: int) -> float | None:
    if trial.state == TrialState.COMPLETE and trial.values:
        return trial.values[index]
    if trial.state == TrialState.PRUNED and index == 0 and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
        return value if math.isfinite(value) else None
    return None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def best_numbers(study: optuna.Study) -> set[int]:
    with contextlib.suppress(ValueError, RuntimeError):
        return {t.number for t in study.best_trials}
    return set()


def report(study: optuna.Study, spec: SweepSpec, out: Path) -> tuple[str, list[Path]]:
    """Print the trial table; write ``trials.csv`` and the plots into ``out``. Returns the table and files."""
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, spec)
    counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("complete", "pruned", "fail", "running")}
    title = f"study {study.study_name}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    text = print_table(rows, title, best_numbers(study))
    (out / "trials.txt").write_text(text, encoding="utf-8")
    write_csv(rows, out / "trials.csv")
    files = [out / "trials.txt", out / "trials.csv"] + write_plots(study, spec, out)
    return text, files
