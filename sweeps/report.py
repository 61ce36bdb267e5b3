"""A study's report: a table of its trials and plots (PNG to look at, HTML to explore).

Plots, each titled with its study and objective: optimization history, intermediate values (what
pruning saw), parameter importances, parallel coordinates, each objective against every searched
option (learning rate included) and against model size, and the Pareto front when there are
several objectives. Pruned trials are drawn at their last report, in grey, as "pruned (last
report)"; failed trials are counted, not drawn. A plot the trials cannot support is a small PNG
with one line saying why, listed in ``plots.txt`` and under the table.

The plots are drawn here with matplotlib and plotly rather than by ``optuna.visualization``, whose
plots leave pruned trials out, carry no study name and draw empty axes when there is nothing to show.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from lmexp.atomic import write_text
from sweeps.spec import SweepSpec
from sweeps.samplers import INFEASIBLE_ATTR
from sweeps.study import BEST_CHECKPOINT_ATTR, INTERRUPTED_ATTR, RESTARTED_ATTR, RESUMES_ATTR, retried_trial_number

log = logging.getLogger(__name__)

PRUNED_LABEL = "pruned (last report)"
CHECKPOINT_ATTR = BEST_CHECKPOINT_ATTR  # set by the worker: the trial's best checkpoint, kept after the study
PLOTLY_FOLDER = ".plotly"  # beside the study folders: one plotly script for every report's HTML
DPI = 110
COMPLETE_COLOUR, PRUNED_COLOUR, BEST_COLOUR = "tab:blue", "0.55", "tab:orange"


# ------------------------------------------------------------------------------- the table
def trial_rows(study: optuna.Study, spec: SweepSpec) -> list[dict[str, Any]]:
    """One row per trial: number, state, the trial it retries, values and where they come from,
    parameters, size, time and why it failed."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    retries = {t.number: retried_trial_number(t) for t in trials}
    any_resumed = any(t.user_attrs.get(RESUMES_ATTR) for t in trials)
    for trial in trials:
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name.lower()}
        if trial.state == TrialState.RUNNING and trial.user_attrs.get(INTERRUPTED_ATTR):
            row["state"] = "interrupted"  # resumes from its checkpoint with --resume
        if any(n is not None for n in retries.values()):  # a dead worker's trial, run again as this one (earlier studies)
            row["retry_of"] = retries[trial.number]
        if any_resumed:  # after its worker died or was stopped: from which step, or from scratch
            resumes = trial.user_attrs.get(RESUMES_ATTR)
            row["resumed"] = "" if not resumes else f"{resumes}x, " + (
                "from its first step" if trial.user_attrs.get(RESTARTED_ATTR)
                else f"at step {trial.user_attrs.get('resumed_at_step', '?')}")
        values = trial.values or [None] * len(spec.objectives)
        untrained = trial.state == TrialState.COMPLETE and not all(math.isfinite(v) for v in values)
        for objective, value in zip(spec.objectives, values):
            row[objective.metric] = None if untrained else value
        row["value_from"] = ("not trained (infeasible)" if untrained else "final") \
            if trial.state == TrialState.COMPLETE else ""
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            step = max(trial.intermediate_values)
            row[spec.objectives[0].metric] = trial.intermediate_values[step]
            row["value_from"] = f"last report at step {step}"
        row.update(trial.params)
        row["n_parameters"] = trial.user_attrs.get("n_parameters")
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else None
        row["seconds"] = seconds
        row["steps"] = max(trial.intermediate_values) if trial.intermediate_values else None
        row["note"] = trial.user_attrs.get("fail_reason") or (
            f"infeasible: {trial.user_attrs[INFEASIBLE_ATTR]}" if trial.user_attrs.get(INFEASIBLE_ATTR) else "")
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]], title: str, best: set[int]) -> str:
    """The trial table, as rich draws it (plain text under a pipe); best trials marked with *."""
    from rich.console import Console
    from rich.table import Table

    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in ("state", "note", "value_from") else "right")
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
    write_text(path, buffer.getvalue())


def best_numbers(study: optuna.Study) -> set[int]:
    with contextlib.suppress(ValueError, RuntimeError):
        return {t.number for t in study.best_trials}
    return set()


def checkpoint_lines(study: optuna.Study, spec: SweepSpec) -> list[str]:
    """Where the best trial's checkpoint is (every Pareto-front trial's, with several objectives)."""
    with contextlib.suppress(ValueError, RuntimeError):
        best = study.best_trials
        if not best:
            return []
        if not spec.multi_objective:
            trial = best[0]
            path, metric = trial.user_attrs.get(CHECKPOINT_ATTR), spec.objectives[0].metric
            if not path:
                return []
            return [f"best trial {trial.number} ({metric}={_short(trial.values[0])}): checkpoint {path}"]
        if any(t.user_attrs.get(CHECKPOINT_ATTR) for t in best):
            lines = []
            for trial in sorted(best, key=lambda t: t.number):
                values = ", ".join(f"{o.metric}={_short(v)}" for o, v in zip(spec.objectives, trial.values))
                path = trial.user_attrs.get(CHECKPOINT_ATTR)
                lines.append(f"Pareto-front trial {trial.number} ({values}): "
                             + (f"checkpoint {path}" if path else "no checkpoint kept"))
            return lines
    return []


# ------------------------------------------------------------------------------- what the plots draw
@dataclass(frozen=True)
class Point:
    """A trial as the plots draw it: complete at its value, pruned at its last report."""

    number: int
    pruned: bool
    value: float
    params: dict[str, Any]
    n_parameters: float | None


@dataclass
class Plot:
    """One plot of the report: its figures, or why it could not be drawn (then a one-line PNG only)."""

    stem: str
    title: str
    figure: Any = None  # matplotlib Figure
    html: Any = None  # plotly Figure
    skipped: str = ""


class Skip(Exception):
    """A plot the study's trials cannot support; the message says why, in a few words."""


@dataclass
class Trials:
    """The study's trials, split the way every plot needs them."""

    study: optuna.Study
    spec: SweepSpec
    trials: list[FrozenTrial]
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.study.study_name

    @classmethod
    def of(cls, study: optuna.Study, spec: SweepSpec) -> Trials:
        trials = study.get_trials(deepcopy=False)
        distributions: dict[str, BaseDistribution] = {}
        for trial in trials:
            for name, distribution in trial.distributions.items():
                distributions.setdefault(name, distribution)
        return cls(study, spec, trials, distributions)

    def count(self, state: TrialState) -> int:
        return sum(1 for t in self.trials if t.state == state)

    def points(self, index: int) -> list[Point]:
        points = []
        for trial in self.trials:
            value = _value(trial, index)
            if value is not None:
                points.append(Point(trial.number, trial.state == TrialState.PRUNED, value, dict(trial.params),
                                    trial.user_attrs.get("n_parameters")))
        return points

    def metric(self, index: int) -> str:
        objective = self.spec.objectives[index]
        return f"{objective.metric} ({objective.direction})"

    def subtitle(self, index: int) -> str:
        """The trials behind a plot: complete, pruned and, not drawn, failed and running ones."""
        parts = [f"{self.count(TrialState.COMPLETE)} complete"]
        pruned = self.count(TrialState.PRUNED)
        if pruned:
            parts.append(f"{pruned} {PRUNED_LABEL}" if index == 0 else f"{pruned} pruned (not drawn)")
        for state, word in ((TrialState.FAIL, "failed"), (TrialState.RUNNING, "running")):
            if self.count(state):
                parts.append(f"{self.count(state)} {word} (not drawn)")
        return ", ".join(parts)

    def nothing_to_draw(self, index: int) -> str:
        failed = self.count(TrialState.FAIL)
        return "no complete or pruned trial with a value" + (f" ({failed} failed)" if failed else "") \
            if self.trials else "the study has no trials yet"


def _value(trial: FrozenTrial, index: int) -> float | None:
    if trial.state == TrialState.COMPLETE and trial.values:
        value = trial.values[index]
    elif trial.state == TrialState.PRUNED and index == 0 and trial.intermediate_values:
        value = trial.intermediate_values[max(trial.intermediate_values)]
    else:
        return None
    return value if value is not None and math.isfinite(value) else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# ------------------------------------------------------------------------------- axes people can read
def _short(value: float) -> str:
    """A tick or value label: 3 significant digits, exponents without padding (1e-5, 2e+6 -> 2e6)."""
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _count(value: float) -> str:
    """A parameter count: 850, 12k, 1.2M."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _log_range(values: Sequence[float]) -> tuple[float, float]:
    """Limits of a log axis around positive values: a factor 1.5 of room (2 each side for one value)."""
    low, high = min(values), max(values)
    return (low / 2, high * 2) if low == high else (low / 1.5, high * 1.5)


def _log_ticks(axis: Any, low: float, high: float, formatter: Callable[[float], str] = _short) -> None:
    """A log axis with at most 6 plain labels (1, 2, 5 per decade over short ranges), no minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    decades = math.log10(high / low)
    subs = (1.0,) if decades >= 2 else (1.0, 2.0, 5.0)
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in subs if low <= m * 10.0 ** e <= high]
    if len(ticks) > 6:
        ticks = ticks[::math.ceil(len(ticks) / 6)]
    if len(ticks) < 2:
        ticks = [float(f"{low * 1.05:.2g}"), float(f"{high / 1.05:.2g}")]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: formatter(v)))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _linear_ticks(axis: Any, distribution: BaseDistribution | None) -> None:
    """At most 6 ticks; an integer option's own values when it has few (batch sizes 8, 16, 24, 32)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if isinstance(distribution, IntDistribution) and (distribution.high - distribution.low) // distribution.step < 6:
        axis.set_major_locator(FixedLocator(range(distribution.low, distribution.high + 1, distribution.step)))
    else:
        axis.set_major_locator(MaxNLocator(nbins=6, integer=isinstance(distribution, IntDistribution)))


def _is_log(distribution: BaseDistribution | None) -> bool:
    return bool(getattr(distribution, "log", False))


def _figure(title: str, subtitle: str, panels: int = 1, columns: int = 3, height: float = 4.5) -> tuple[Any, list[Any]]:
    """A figure with ``panels`` axes, the study and objective as its title, the trials drawn below it."""
    from matplotlib.figure import Figure

    columns = min(panels, columns)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(max(7.5, 4.2 * columns), height * rows if rows > 1 else height), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).flat)
    for extra in axes[panels:]:
        extra.set_visible(False)
    figure.suptitle(f"{title}\n{subtitle}", fontsize=11)
    return figure, axes[:panels]


def _html(title: str, subtitle: str) -> Any:
    import plotly.graph_objects as go

    figure = go.Figure()
    figure.update_layout(title={"text": f"{title}<br><sup>{subtitle}</sup>"}, template="plotly_white")
    return figure


def _scatter_states(axis: Any, points: list[Point], x: Callable[[Point], Any], label_counts: bool = True) -> None:
    """Complete trials as blue dots, pruned ones as grey crosses, each with its legend entry."""
    for pruned, colour, marker, label in ((False, COMPLETE_COLOUR, "o", "complete"),
                                          (True, PRUNED_COLOUR, "x", PRUNED_LABEL)):
        chosen = [p for p in points if p.pruned == pruned and x(p) is not None]
        if chosen:
            axis.scatter([x(p) for p in chosen], [p.value for p in chosen], c=colour, marker=marker, s=36,
                         label=f"{label} ({len(chosen)})" if label_counts else label, zorder=3)


def _html_states(figure: Any, points: list[Point], x: Callable[[Point], Any], where: dict[str, int] | None = None,
                 **trace: Any) -> None:
    import plotly.graph_objects as go

    for pruned, colour, symbol, label in ((False, "#1f77b4", "circle", "complete"),
                                          (True, "#8c8c8c", "x", PRUNED_LABEL)):
        chosen = [p for p in points if p.pruned == pruned and x(p) is not None]
        if chosen:
            figure.add_trace(go.Scatter(x=[x(p) for p in chosen], y=[p.value for p in chosen], mode="markers",
                                        name=label, marker={"color": colour, "symbol": symbol, "size": 9},
                                        text=[f"trial {p.number}" for p in chosen], legendgroup=label, **trace),
                             **(where or {}))


# ------------------------------------------------------------------------------- the plots
def history_plot(trials: Trials, index: int, stem: str) -> Plot:
    """The objective of each trial in order, pruned trials at their last report, and the best so far."""
    from matplotlib.ticker import MaxNLocator

    points = trials.points(index)
    title = f"{trials.name}: {trials.metric(index)} by trial"
    if not points:
        raise Skip(trials.nothing_to_draw(index))
    figure, (axis,) = _figure(title, trials.subtitle(index))
    _scatter_states(axis, points, lambda p: p.number)
    best = _best_so_far(points, trials.spec.objectives[index].direction)
    if best:
        axis.step(*zip(*best), where="post", color=BEST_COLOUR, label="best so far (complete)", zorder=2)
    axis.set_xlabel("trial")
    axis.set_ylabel(trials.spec.objectives[index].metric)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=9)
    html = _html(title, trials.subtitle(index))
    _html_states(html, points, lambda p: p.number)
    if best:
        html.add_scatter(x=[b[0] for b in best], y=[b[1] for b in best], mode="lines", line={"shape": "hv"},
                         name="best so far (complete)")
    html.update_layout(xaxis_title="trial", yaxis_title=trials.spec.objectives[index].metric)
    return Plot(stem, title, figure, html)


def _best_so_far(points: list[Point], direction: str) -> list[tuple[int, float]]:
    pick = min if direction == "minimize" else max
    best: list[tuple[int, float]] = []
    for point in sorted((p for p in points if not p.pruned), key=lambda p: p.number):
        best.append((point.number, point.value if not best else pick(best[-1][1], point.value)))
    if best:
        last = max(p.number for p in points)
        if last > best[-1][0]:
            best.append((last, best[-1][1]))
    return best


def intermediate_plot(trials: Trials, index: int, stem: str) -> Plot:
    """Every trial's reports by training step: what the pruner compared."""
    title = f"{trials.name}: {trials.metric(0)} reported during training"
    if trials.spec.multi_objective:
        raise Skip(f"needs a single objective (Optuna keeps reports only then), this study has "
                   f"{len(trials.spec.objectives)}")
    curves = [t for t in trials.trials if t.intermediate_values and t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not curves:
        raise Skip("no complete or pruned trial reported a value")
    figure, (axis,) = _figure(title, trials.subtitle(0))
    html = _html(title, trials.subtitle(0))
    labelled: set[bool] = set()
    for trial in curves:
        pruned = trial.state == TrialState.PRUNED
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[s] for s in steps]
        label = (PRUNED_LABEL if pruned else "complete") if pruned not in labelled else None
        labelled.add(pruned)
        axis.plot(steps, values, color=PRUNED_COLOUR if pruned else COMPLETE_COLOUR, linestyle="--" if pruned else "-",
                  marker="x" if pruned else ".", markevery=[len(steps) - 1] if pruned else None, alpha=0.8, label=label)
        html.add_scatter(x=steps, y=values, mode="lines+markers", name=f"trial {trial.number}"
                         + (" (pruned)" if pruned else ""),
                         line={"dash": "dash" if pruned else "solid", "color": "#8c8c8c" if pruned else None})
    axis.set_xlabel("training step")
    axis.set_ylabel(trials.spec.objectives[0].metric)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=9)
    html.update_layout(xaxis_title="training step", yaxis_title=trials.spec.objectives[0].metric)
    return Plot(stem, title, figure, html)


def importance_plot(trials: Trials, index: int, stem: str) -> Plot:
    """How much of the objective's variation each searched option explains (Optuna's evaluator)."""
    title = f"{trials.name}: parameter importance for {trials.metric(index)}"
    complete = [t for t in trials.trials if _value(t, index) is not None and t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        raise Skip(f"needs 2 complete trials, this study has {len(complete)}")
    varying = [name for name in trials.distributions
               if len({repr(t.params.get(name)) for t in complete}) > 1]
    if not varying:
        raise Skip(f"needs a parameter that differs between the {len(complete)} complete trials")
    try:
        importances = optuna.importance.get_param_importances(
            trials.study, params=varying, target=lambda t: t.values[index])
    except (ValueError, RuntimeError) as err:
        raise Skip(str(err).splitlines()[0]) from None
    names = list(reversed(importances))
    values = [importances[n] for n in names]
    subtitle = f"over {len(complete)} complete trials (pruned and failed ones not used)"
    figure, (axis,) = _figure(title, subtitle, height=max(2.5, 1.2 + 0.45 * len(names)))
    bars = axis.barh(names, values, color=COMPLETE_COLOUR)
    axis.bar_label(bars, labels=[f"{v:.2f}" for v in values], padding=3, fontsize=9)
    axis.set_xlim(0, max(values) * 1.15 or 1)
    axis.set_xlabel("importance (sums to 1)")
    html = _html(title, subtitle)
    html.add_bar(x=values, y=names, orientation="h", text=[f"{v:.2f}" for v in values])
    html.update_layout(xaxis_title="importance (sums to 1)")
    return Plot(stem, title, figure, html)


def _axis_position(distribution: BaseDistribution | None, values: list[Any]) -> tuple[Callable[[Any], float],
                                                                                       list[tuple[float, str]]]:
    """Where a parameter's values sit on a 0..1 axis, and that axis' labels (value, text)."""
    if isinstance(distribution, CategoricalDistribution):
        choices = list(distribution.choices)
        spread = max(1, len(choices) - 1)
        where = (lambda v: 0.5) if len(choices) == 1 else (lambda v: choices.index(v) / spread)
        return where, [(where(c), str(c)) for c in choices]
    present = [v for v in values if v is not None]
    low, high = min(present), max(present)
    log = _is_log(distribution) and low > 0
    scale = (lambda v: math.log10(v)) if log else (lambda v: float(v))
    if low == high:
        return (lambda v: 0.5), [(0.5, _short(low))]
    width = scale(high) - scale(low)
    where = lambda v: (scale(v) - scale(low)) / width
    labels = [(0.0, _short(low)), (1.0, _short(high))]
    if len(set(present)) > 2:
        middle = 10 ** ((scale(low) + scale(high)) / 2) if log else (low + high) / 2
        labels.insert(1, (0.5, _short(middle)))
    return where, labels


def parallel_plot(trials: Trials, index: int, stem: str) -> Plot:
    """One line per trial through every searched option to the objective, coloured by the objective."""
    import matplotlib
    import plotly.graph_objects as go
    from matplotlib.colors import Normalize

    title = f"{trials.name}: {trials.metric(index)} across the searched options"
    points = trials.points(index)
    if not points:
        raise Skip(trials.nothing_to_draw(index))
    if not trials.distributions:
        raise Skip("needs searched parameters, this study has none")
    names = list(trials.distributions)
    metric = trials.spec.objectives[index].metric
    columns = [_axis_position(trials.distributions[n], [p.params.get(n) for p in points]) for n in names]
    columns.append(_axis_position(None, [p.value for p in points]))
    axis_names = [*names, metric]
    figure, (axis,) = _figure(title, trials.subtitle(index), height=4.8)
    figure.set_size_inches(max(7.5, 1.9 * len(axis_names) + 2), 4.8)
    complete_values = [p.value for p in points if not p.pruned]
    colours = matplotlib.colormaps["viridis_r" if trials.spec.objectives[index].direction == "maximize" else "viridis"]
    norm = Normalize(min(complete_values), max(complete_values)) if len(set(complete_values)) > 1 else None
    labelled: set[bool] = set()
    for point in sorted(points, key=lambda p: not p.pruned):  # complete lines drawn over pruned ones
        ys = [where(point.params.get(n)) if point.params.get(n) is not None else math.nan
              for (where, _), n in zip(columns, names)] + [columns[-1][0](point.value)]
        colour = PRUNED_COLOUR if point.pruned else colours(norm(point.value)) if norm else COMPLETE_COLOUR
        label = (PRUNED_LABEL if point.pruned else "complete") if point.pruned not in labelled else None
        labelled.add(point.pruned)
        axis.plot(range(len(ys)), ys, color=colour, linestyle="--" if point.pruned else "-", marker="o", markersize=3,
                  linewidth=1.0 if point.pruned else 1.6, alpha=0.7 if point.pruned else 0.9, label=label)
    for x, (_, labels) in enumerate(columns):
        axis.axvline(x, color="0.3", linewidth=0.8)
        for y, text in labels:
            axis.annotate(text, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=8, va="center",
                          bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    axis.set_xticks(range(len(axis_names)), axis_names, fontsize=9, rotation=20 if len(axis_names) > 5 else 0)
    axis.set_xlim(-0.2, len(axis_names) - 0.4)
    axis.set_ylim(-0.08, 1.08)
    axis.set_yticks([])
    for side in ("top", "right", "left"):
        axis.spines[side].set_visible(False)
    if norm:
        figure.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=colours), ax=axis, label=f"{metric} (complete)",
                        shrink=0.8)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=9, frameon=False)
    html = _html(title, trials.subtitle(index))
    dimensions = []
    for name in names:
        distribution = trials.distributions[name]
        where, labels = _axis_position(distribution, [p.params.get(name) for p in points])
        dimensions.append({"label": name, "range": [0, 1], "values": [where(p.params[name]) if name in p.params
                                                                      else None for p in points],
                           "tickvals": [v for v, _ in labels], "ticktext": [t for _, t in labels]})
    dimensions.append({"label": "state", "range": [0, 1], "values": [1 if p.pruned else 0 for p in points],
                       "tickvals": [0, 1], "ticktext": ["complete", PRUNED_LABEL]})
    dimensions.append({"label": metric, "values": [p.value for p in points]})
    html.add_trace(go.Parcoords(dimensions=dimensions, line={"color": [p.value for p in points],
                                                            "colorscale": "Viridis", "showscale": True}))
    return Plot(stem, title, figure, html)


def slice_plot(trials: Trials, index: int, stem: str) -> Plot:
    """The objective against each searched option, one panel each (log axes where the option is searched on one)."""
    from plotly.subplots import make_subplots

    title = f"{trials.name}: {trials.metric(index)} against each searched option"
    points = trials.points(index)
    if not points:
        raise Skip(trials.nothing_to_draw(index))
    if not trials.distributions:
        raise Skip("needs searched parameters, this study has none")
    names = list(trials.distributions)
    metric = trials.spec.objectives[index].metric
    figure, axes = _figure(title, trials.subtitle(index), panels=len(names), height=4.2)
    html = make_subplots(rows=math.ceil(len(names) / 3), cols=min(3, len(names)), subplot_titles=names,
                         shared_yaxes=True)
    html.update_layout(title={"text": f"{title}<br><sup>{trials.subtitle(index)}</sup>"}, template="plotly_white")
    for number, (name, axis) in enumerate(zip(names, axes)):
        distribution = trials.distributions[name]
        row, col = number // 3 + 1, number % 3 + 1
        if isinstance(distribution, CategoricalDistribution):
            choices = list(distribution.choices)
            position = lambda p, n=name, c=choices: c.index(p.params[n]) if n in p.params else None
            axis.set_xticks(range(len(choices)), [str(c) for c in choices], fontsize=9)
            axis.set_xlim(-0.5, len(choices) - 0.5)
            html_x = lambda p, n=name: str(p.params[n]) if n in p.params else None
            html.update_xaxes(type="category", categoryorder="array", categoryarray=[str(c) for c in choices],
                              row=row, col=col)
        else:
            position = html_x = lambda p, n=name: p.params.get(n)
            present = [p.params[name] for p in points if name in p.params]
            if _is_log(distribution) and present:
                axis.set_xscale("log")
                low, high = _log_range(present)
                axis.set_xlim(low, high)
                _log_ticks(axis.xaxis, low, high)
                html.update_xaxes(type="log", row=row, col=col)
            else:
                _linear_ticks(axis.xaxis, distribution)
        _scatter_states(axis, points, position, label_counts=False)
        _html_states(html, points, html_x, where={"row": row, "col": col}, showlegend=number == 0)
        axis.set_xlabel(name)
        axis.grid(alpha=0.3)
        if number % 3 == 0:
            axis.set_ylabel(metric)
    axes[0].legend(loc="best", fontsize=9)
    return Plot(stem, title, figure, html)


def size_plot(trials: Trials, index: int, stem: str) -> Plot:
    """The objective against model size (parameters, log axis)."""
    title = f"{trials.name}: {trials.metric(index)} against model size"
    points = [p for p in trials.points(index) if p.n_parameters]
    if not points:
        raise Skip("needs trials that recorded n_parameters" if trials.points(index) else trials.nothing_to_draw(index))
    figure, (axis,) = _figure(title, trials.subtitle(index))
    _scatter_states(axis, points, lambda p: p.n_parameters)
    axis.set_xscale("log")
    low, high = _log_range([p.n_parameters for p in points])
    axis.set_xlim(low, high)
    _log_ticks(axis.xaxis, low, high, formatter=_count)
    axis.set_xlabel("parameters")
    axis.set_ylabel(trials.spec.objectives[index].metric)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=9)
    html = _html(title, trials.subtitle(index))
    _html_states(html, points, lambda p: p.n_parameters)
    html.update_layout(xaxis={"title": "parameters", "type": "log"},
                       yaxis={"title": trials.spec.objectives[index].metric})
    return Plot(stem, title, figure, html)


def pareto_plot(trials: Trials, index: int, stem: str) -> Plot:
    """Each pair of objectives, the Pareto-front trials (none other is better in every objective) marked."""
    import plotly.graph_objects as go

    objectives = trials.spec.objectives
    title = f"{trials.name}: Pareto front of " + " and ".join(trials.metric(i) for i in range(len(objectives)))
    if len(objectives) < 2:
        raise Skip(f"needs 2 or more objectives, this study has {len(objectives)}")
    complete = [t for t in trials.trials if t.state == TrialState.COMPLETE and t.values
                and all(math.isfinite(v) for v in t.values)]
    if not complete:
        raise Skip(trials.nothing_to_draw(index).replace("complete or pruned", "complete"))
    front = best_numbers(trials.study)
    pairs = [(i, j) for i in range(len(objectives)) for j in range(i + 1, len(objectives))]
    subtitle = f"{len(complete)} complete trials, {len(front)} on the front"
    figure, axes = _figure(title, subtitle, panels=len(pairs))
    for (i, j), axis in zip(pairs, axes):
        for on_front, colour, label in ((False, PRUNED_COLOUR, "dominated"), (True, BEST_COLOUR, "Pareto front")):
            chosen = sorted((t for t in complete if (t.number in front) == on_front), key=lambda t: t.values[i])
            if chosen:
                axis.scatter([t.values[i] for t in chosen], [t.values[j] for t in chosen], c=colour, s=36,
                             label=f"{label} ({len(chosen)})", zorder=3)
                if on_front:
                    axis.plot([t.values[i] for t in chosen], [t.values[j] for t in chosen], color=colour, alpha=0.5)
        for which, k in ((axis.xaxis, i), (axis.yaxis, j)):
            values = [t.values[k] for t in complete]
            which.set_label_text(objectives[k].metric)
            if objectives[k].metric == "n_parameters" and min(values) > 0:
                (axis.set_xscale if which is axis.xaxis else axis.set_yscale)("log")
                low, high = _log_range(values)
                (axis.set_xlim if which is axis.xaxis else axis.set_ylim)(low, high)
                _log_ticks(which, low, high, formatter=_count)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=9)
    html = _html(title, subtitle)
    text = [f"trial {t.number}" for t in complete]
    colours = ["#ff7f0e" if t.number in front else "#8c8c8c" for t in complete]
    if len(objectives) == 2:
        html.add_trace(go.Scatter(x=[t.values[0] for t in complete], y=[t.values[1] for t in complete], mode="markers",
                                  text=text, marker={"color": colours, "size": 9}, name="trials"))
        html.update_layout(xaxis_title=objectives[0].metric, yaxis_title=objectives[1].metric)
    else:
        html.add_trace(go.Splom(dimensions=[{"label": o.metric, "values": [t.values[k] for t in complete]}
                                            for k, o in enumerate(objectives)], text=text,
                                marker={"color": colours, "size": 8}, diagonal_visible=False))
    return Plot(stem, title, figure, html)


def plan(study: optuna.Study, spec: SweepSpec) -> list[Plot]:
    """Every plot of the report: drawn, or skipped with the reason (the caller writes them)."""
    trials = Trials.of(study, spec)
    makers: list[tuple[str, Callable[[Trials, int, str], Plot], int]] = []
    single = not spec.multi_objective
    # Plots of the study's kind only: a front for several objectives, reports to the pruner for one.
    makers.append(("intermediate_values", intermediate_plot, 0) if single else ("pareto_front", pareto_plot, 0))
    for index, objective in enumerate(spec.objectives):
        suffix = "" if single else f"_{_slug(objective.metric)}"
        makers += [(f"optimization_history{suffix}", history_plot, index),
                   (f"param_importances{suffix}", importance_plot, index),
                   (f"parallel_coordinate{suffix}", parallel_plot, index),
                   (f"slice{suffix}", slice_plot, index)]
        if objective.metric != "n_parameters":
            makers.append((f"{_slug(objective.metric)}_vs_size", size_plot, index))
    plots = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib's and Optuna's (experimental evaluators): not the reader's concern
        for stem, maker, index in makers:
            try:
                plots.append(maker(trials, index, stem))
            except Skip as reason:
                plots.append(Plot(stem, f"{study.study_name}: {stem} of {trials.metric(index)}", skipped=str(reason)))
    return plots


# ------------------------------------------------------------------------------- files
def shared_plotly_script(out: Path) -> Path:
    """plotly's script, written once beside the study folders (``runs/.plotly/``) for every report's HTML.

    ``out`` is ``runs/<study>/report`` by default; any other folder keeps the script in its parent.
    Written atomically, only when missing, so reports written at once by several processes agree.
    """
    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    out = out.resolve()
    folder = (out.parent.parent if out.name == "report" else out.parent) / PLOTLY_FOLDER
    script = folder / f"plotly-{get_plotlyjs_version()}.min.js"
    if not script.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_text(script, get_plotlyjs())
    return script


def write_plots(study: optuna.Study, spec: SweepSpec, out: Path) -> tuple[list[Path], list[Plot]]:
    """Every plot as ``NAME.png`` and ``NAME.html``; a plot that cannot be drawn as a one-line ``NAME.png``.
    Returns the files written and the skipped plots."""
    out.mkdir(parents=True, exist_ok=True)
    plots = plan(study, spec)
    script = None
    written: list[Path] = []
    for plot in plots:
        png = out / f"{plot.stem}.png"
        if plot.skipped:
            _placeholder(png, plot)
            (out / f"{plot.stem}.html").unlink(missing_ok=True)  # an earlier report's, now out of date
            written.append(png)
            continue
        plot.figure.savefig(png, dpi=DPI, metadata={"Title": plot.title})
        if script is None:
            try:
                script = Path(os.path.relpath(shared_plotly_script(out), out.resolve())).as_posix()
            except OSError as err:  # the folder above the study's cannot be written: a copy beside the plots
                log.warning(f"plotly's script cannot be shared beside the study folders ({err.strerror}): "
                            f"one copy in {out}")
                script = "directory"
        plot.html.write_html(out / f"{plot.stem}.html", include_plotlyjs=script)
        written += [png, out / f"{plot.stem}.html"]
    drawn = [f"  {p.stem}: {p.stem}.png, {p.stem}.html" for p in plots if not p.skipped]
    skipped = [f"  {p.stem}: {p.skipped} ({p.stem}.png says so)" for p in plots if p.skipped]
    listing = [f"plots of study {study.study_name}, objectives: {', '.join(trials_metrics(spec))}",
               "written:", *(drawn or ["  (none)"]), "skipped:", *(skipped or ["  (none)"])]
    write_text(out / "plots.txt", "\n".join(listing) + "\n")
    written.append(out / "plots.txt")
    return written, [p for p in plots if p.skipped]


def trials_metrics(spec: SweepSpec) -> list[str]:
    return [f"{o.metric} ({o.direction})" for o in spec.objectives]


def _placeholder(path: Path, plot: Plot) -> None:
    """A small image in place of a plot that cannot be drawn: one line saying why."""
    from matplotlib.figure import Figure

    line = f"{plot.stem}: {plot.skipped}"
    figure = Figure(figsize=(max(4.0, 0.075 * len(line) + 0.6), 0.6))
    figure.text(0.5, 0.5, line, ha="center", va="center", fontsize=10, color="0.25")
    figure.savefig(path, dpi=DPI, metadata={"Title": f"{plot.title} (skipped: {plot.skipped})"})


def report(study: optuna.Study, spec: SweepSpec, out: Path) -> tuple[str, list[Path]]:
    """Print the trial table, the skipped plots and the best checkpoint; write ``trials.txt``,
    ``trials.csv``, ``plots.txt`` and the plots into ``out``. Returns the printed text and the files."""
    out.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, spec)
    counts = {s: sum(1 for r in rows if r["state"] == s)
              for s in ("complete", "pruned", "fail", "running", "interrupted")}
    title = f"study {study.study_name}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    text = print_table(rows, title, best_numbers(study))
    write_csv(rows, out / "trials.csv")
    written, skipped = write_plots(study, spec, out)
    notes = [f"skipped plots ({len(skipped)}, see {out / 'plots.txt'}):"] if skipped else []
    notes += [f"  {p.stem}: {p.skipped}" for p in skipped]
    notes += checkpoint_lines(study, spec)
    if notes:
        print("\n".join(notes))
        text += "\n".join(notes) + "\n"
    write_text(out / "trials.txt", text)
    return text, [out / "trials.txt", out / "trials.csv", *written]
