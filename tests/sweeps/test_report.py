"""A study's report: the table and CSV, every plot titled and readable, pruned trials drawn apart,
plots that cannot be drawn replaced by one line and listed, one shared plotly script, the best checkpoint."""

from __future__ import annotations

import csv
import itertools
import json
import re
from pathlib import Path

import optuna
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from PIL import Image

from sweeps.report import PRUNED_LABEL, plan, report
from sweeps.spec import parse_spec

C, P, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
DISTRIBUTIONS = {"model.lr": FloatDistribution(1e-3, 1e-2, log=True),
                 "size": CategoricalDistribution(["small", "medium"]),
                 "data.batch_size": IntDistribution(8, 32, step=8)}
LRS = [1.2e-3, 7.5e-3, 2.2e-3, 4.1e-3, 9.6e-3, 1.6e-3, 5.5e-3, 3.3e-3, 8.1e-3, 2.7e-3, 6.2e-3, 1.1e-3]


@pytest.fixture(autouse=True)
def quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


def make_study(name: str, states: list[TrialState], objectives: list | None = None, same_params: bool = False,
               attrs: dict[int, dict] | None = None) -> tuple[optuna.Study, object]:
    """A study of ``states`` trials with made-up reports at steps 10 and 20 (pruned ones stop at 10)."""
    spec = parse_spec({"study": name, "fit": {"config": ["fit.yaml"]},
                       "space": {"model.init_args.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
                       **({"objectives": objectives} if objectives else {})})
    study = optuna.create_study(study_name=name, directions=spec.directions)
    for number, state in enumerate(states):
        size = "small" if same_params or number % 2 else "medium"
        params = {"model.lr": 3e-3 if same_params else LRS[number % len(LRS)], "size": size,
                  "data.batch_size": 16 if same_params else 8 * (1 + number % 4)}
        curve = {10: 3.0 - 0.01 * number, 20: 2.5 - 0.02 * number}
        n_parameters = 20_000 if size == "small" else 80_000
        user_attrs = {"n_parameters": n_parameters, **(attrs or {}).get(number, {})}
        values = None
        if state == C:
            values = [min(curve.values())] + ([n_parameters] if objectives else [])
        elif state == P:
            curve = {10: curve[10]}
        else:
            curve = {}
        study.add_trial(create_trial(state=state, params=params, distributions=DISTRIBUTIONS, values=values,
                                     intermediate_values={} if objectives else curve, user_attrs=user_attrs))
    return study, spec


def plots_by_stem(study, spec) -> dict:
    return {plot.stem: plot for plot in plan(study, spec)}


def png_title(path: Path) -> str:
    with Image.open(path) as image:
        return image.text.get("Title", "")


# ------------------------------------------------------------------------------- table and CSV
def test_trials_csv_says_where_each_value_comes_from(tmp_path):
    study, spec = make_study("sources", [C, P, F])
    text, _ = report(study, spec, tmp_path / "report")
    with open(tmp_path / "report" / "trials.csv", newline="") as handle:
        rows = {int(r["trial"]): r for r in csv.DictReader(handle)}
    assert rows[0]["value_from"] == "final" and float(rows[0]["val/loss"]) == pytest.approx(2.5)
    assert rows[1]["value_from"] == "last report at step 10"
    assert float(rows[1]["val/loss"]) == pytest.approx(3.0 - 0.01)  # its last report, not a final value
    assert rows[2]["value_from"] == "" and rows[2]["val/loss"] == ""
    assert "last report at step 10" in text


# ------------------------------------------------------------------------------- titles and axes
@pytest.mark.parametrize("states, objectives", [
    ([C], None), ([C, P, P, P, P, F], None), ([C, P, C, C, P, C, F, C, P, C, C, C], None),
    ([C, C, C, F, C], ["val/loss", "n_parameters"]),
])
def test_every_plot_file_names_its_study_and_objective(tmp_path, states, objectives):
    study, spec = make_study("zebra-study", states, objectives)
    _, files = report(study, spec, tmp_path / "runs" / "zebra-study" / "report")
    pngs = [f for f in files if f.suffix == ".png"]
    htmls = [f for f in files if f.suffix == ".html"]
    assert len(pngs) >= 6 and htmls
    for png in pngs:
        title = png_title(png)
        assert "zebra-study: " in title and ("val/loss" in title or "n_parameters" in title), (png.name, title)
    for html in htmls:
        titles = [json.loads(f'"{t}"') for t in re.findall(r'"title":\{"text":"((?:[^"\\]|\\.)*)"', html.read_text())]
        assert any("zebra-study: " in t and ("val/loss" in t or "n_parameters" in t) for t in titles), html.name
    for plot in plan(study, spec):
        if not plot.skipped:
            assert plot.figure.get_suptitle().startswith("zebra-study: "), plot.stem


@pytest.mark.parametrize("states", [[C], [C, P, C, C, P, C, F, C, P, C, C, C]])
def test_log_axes_have_few_labels_inside_the_axis_that_do_not_overlap(states):
    study, spec = make_study("ticks", states)
    plots = plots_by_stem(study, spec)
    for stem in ("slice", "val_loss_vs_size"):
        figure = plots[stem].figure
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        log_axes = [a for a in figure.axes if a.get_xscale() == "log"]
        assert log_axes, stem
        for axis in log_axes:
            low, high = axis.get_xlim()
            ticks = [t for t in axis.xaxis.get_majorticklocs() if low <= t <= high]
            labels = [label for label in axis.get_xticklabels() if label.get_text()]
            assert 2 <= len(ticks) <= 6 and len(labels) == len(ticks), (stem, ticks)
            assert not any(label.get_text() for label in axis.xaxis.get_minorticklabels())
            boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.x0)
            assert all(left.x1 < right.x0 for left, right in itertools.pairwise(boxes)), [b.get_text() for b in labels]
        if stem == "slice":  # one panel per searched option and no colour bar, whatever the number of trials
            assert len([a for a in figure.axes if a.get_visible()]) == len(DISTRIBUTIONS)


# ------------------------------------------------------------------------------- pruned and failed trials
def test_pruned_trials_are_drawn_apart_and_failed_ones_counted():
    study, spec = make_study("pruning", [C, P, P, P, P, F])
    plots = plots_by_stem(study, spec)
    history = plots["optimization_history"]
    traces = {trace.name: trace for trace in history.html.data}
    assert list(traces[PRUNED_LABEL].x) == [1, 2, 3, 4] and list(traces["complete"].x) == [0]
    assert list(traces[PRUNED_LABEL].y) == pytest.approx([3.0 - 0.01 * n for n in (1, 2, 3, 4)])
    assert all(5 not in list(trace.x) for trace in history.html.data)  # the failed trial is not drawn ...
    assert "1 failed (not drawn)" in history.figure.get_suptitle()  # ... but counted
    legend = [t.get_text() for t in history.figure.axes[0].get_legend().get_texts()]
    assert any(text.startswith(PRUNED_LABEL) for text in legend)
    drawn = [c for c in history.figure.axes[0].collections if c.get_label().startswith(PRUNED_LABEL)]
    assert [v for xy in drawn[0].get_offsets() for v in xy] == pytest.approx(
        [v for n in (1, 2, 3, 4) for v in (n, 3.0 - 0.01 * n)])

    parallel = plots["parallel_coordinate"]
    (parcoords,) = parallel.html.data
    state = next(d for d in parcoords.dimensions if d.label == "state")
    assert list(state.values) == [0, 1, 1, 1, 1] and PRUNED_LABEL in state.ticktext
    legend = [t.get_text() for t in parallel.figure.axes[0].get_legend().get_texts()]
    assert PRUNED_LABEL in legend and "1 failed (not drawn)" in parallel.figure.get_suptitle()

    slices = plots["slice"]
    assert sum(len(t.x) for t in slices.html.data if t.name == PRUNED_LABEL) == 4 * len(DISTRIBUTIONS)


# ------------------------------------------------------------------------------- plots that cannot be drawn
@pytest.mark.parametrize("states, same_params, skipped", [
    ([C], False, {"param_importances": "needs 2 complete trials, this study has 1"}),
    ([P, P, F], False, {"param_importances": "needs 2 complete trials, this study has 0"}),
    ([C, C, C], True, {"param_importances": "needs a parameter that differs between the 3 complete trials"}),
    ([F, F], False, {"optimization_history": "no complete or pruned trial with a value (2 failed)",
                     "slice": "no complete or pruned trial with a value (2 failed)",
                     "parallel_coordinate": "no complete or pruned trial with a value (2 failed)",
                     "val_loss_vs_size": "no complete or pruned trial with a value (2 failed)",
                     "intermediate_values": "no complete or pruned trial reported a value"}),
    ([], False, {"optimization_history": "the study has no trials yet"}),
])
def test_a_plot_that_cannot_be_drawn_is_one_line_and_listed(tmp_path, capsys, states, same_params, skipped):
    study, spec = make_study("degraded", states, same_params=same_params)
    out = tmp_path / "report"
    text, _ = report(study, spec, out)
    printed = capsys.readouterr().out
    listing = (out / "plots.txt").read_text()
    saved = (out / "trials.txt").read_text()
    assert "pareto_front" not in listing  # not a plot of a study with one objective
    for stem, reason in skipped.items():
        line = f"{stem}: {reason}"
        assert line in listing and line in printed and line in saved and line in text, line
        assert not (out / f"{stem}.html").exists()
        with Image.open(out / f"{stem}.png") as image:
            assert image.height < 100  # one line of text, not an empty 0..1 plot
            assert reason in image.text["Title"] and "degraded: " in image.text["Title"]
    drawn = listing.split("skipped:")[0]
    assert all(f"  {stem}:" not in drawn for stem in skipped)
    if states and P in states:  # only pruned trials: the history still shows them
        assert "  optimization_history: optimization_history.png, optimization_history.html" in drawn
        assert (out / "optimization_history.html").is_file()


def test_skipped_plots_leave_no_html_behind_from_an_earlier_report(tmp_path):
    out = tmp_path / "report"
    report(*make_study("again", [C, C, C]), out)
    assert (out / "param_importances.html").is_file()
    report(*make_study("again", [C]), out)
    assert not (out / "param_importances.html").exists()


def test_several_objectives_draw_a_front_and_skip_the_reports(tmp_path):
    study, spec = make_study("front", [C, C, C, C], ["val/loss", "n_parameters"])
    out = tmp_path / "report"
    report(study, spec, out)
    listing = (out / "plots.txt").read_text()
    assert "  pareto_front: pareto_front.png, pareto_front.html" in listing
    assert "intermediate_values" not in listing  # Optuna keeps reports to the pruner for one objective only
    front = plots_by_stem(study, spec)["pareto_front"]
    on_front = {t.number for t in study.best_trials}
    axis = front.figure.axes[0]
    marked = next(c for c in axis.collections if c.get_label().startswith("Pareto front"))
    assert len(marked.get_offsets()) == len(on_front) and f"Pareto front ({len(on_front)})" == marked.get_label()
    for metric in ("val_loss", "n_parameters"):
        assert (out / f"optimization_history_{metric}.png").is_file()


# ------------------------------------------------------------------------------- one plotly script
def test_reports_share_one_plotly_script(tmp_path):
    runs = tmp_path / "runs"
    for name in ("first", "second"):
        report(*make_study(name, [C, P, C]), runs / name / "report")
    (script,) = (runs / ".plotly").iterdir()
    assert script.name.startswith("plotly-") and script.name.endswith(".min.js") and script.stat().st_size > 1_000_000
    written = script.stat().st_mtime_ns
    report(*make_study("third", [C]), runs / "third" / "report")
    assert script.stat().st_mtime_ns == written  # written once, when missing
    for name in ("first", "second", "third"):
        out = runs / name / "report"
        assert not (out / "plotly.min.js").exists()
        for html in out.glob("*.html"):
            text = html.read_text()
            assert len(text) < 200_000  # the script is referenced, not embedded
            (source,) = re.findall(r'<script charset="utf-8" src="([^"]+)"></script>', text)
            assert (out / source).resolve() == script.resolve()


# ------------------------------------------------------------------------------- the best checkpoint
def test_the_best_trials_checkpoint_is_named(tmp_path, capsys):
    study, spec = make_study("ckpt", [C, C, P], attrs={0: {"best_checkpoint": "runs/ckpt/trial-0000/best.ckpt"},
                                                        1: {"best_checkpoint": "runs/ckpt/trial-0001/best.ckpt"}})
    out = tmp_path / "report"
    text, _ = report(study, spec, out)
    line = f"best trial 1 (val/loss={study.best_value:.3g}): checkpoint runs/ckpt/trial-0001/best.ckpt"
    assert line in text and line in capsys.readouterr().out and line in (out / "trials.txt").read_text()
    assert "trial-0000" not in text


def test_no_checkpoint_line_without_a_recorded_checkpoint(tmp_path):
    text, _ = report(*make_study("plain", [C, C]), tmp_path / "report")
    assert "best trial" not in text and ": checkpoint " not in text


def test_the_pareto_fronts_checkpoints_are_named(tmp_path):
    study, spec = make_study("front-ckpt", [C, C, C, C], ["val/loss", "n_parameters"],
                             attrs={n: {"best_checkpoint": f"trial-{n}/best.ckpt"} for n in range(4)})
    text, _ = report(study, spec, tmp_path / "report")
    front = sorted(t.number for t in study.best_trials)
    lines = [line for line in text.splitlines() if line.startswith("Pareto-front trial")]
    assert [int(line.split()[2]) for line in lines] == front
    assert all(f"checkpoint trial-{n}/best.ckpt" in line for n, line in zip(front, lines))
