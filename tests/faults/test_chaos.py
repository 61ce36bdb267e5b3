"""Every scenario of ``lmexp chaos`` on a tiny config: a fault at an exact point, then a resume.

Each asserts (lmexp.verbs.chaos): the faulted run exits as it should, with one ``error:`` line and no
traceback where it reports; everything complete that was on disk still loads and is finite; the
resumed run ends with exactly the weights of an uninterrupted run; no temporary file and no
process is left.
"""

from __future__ import annotations

import pytest

from lmexp.cli import main
from lmexp.verbs.chaos import SCENARIOS, Chaos

pytestmark = pytest.mark.fault


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario(chaos: Chaos, scenario) -> None:
    outcome = chaos.run(scenario)
    assert outcome.ok, f"{scenario.name}: {outcome.problems} (logs in {chaos.out / scenario.name})"


def test_chaos_command_lists_and_refuses_bad_input(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["chaos", "--list"])
    listed = capsys.readouterr().out
    assert stop.value.code == 0 and all(s.name in listed for s in SCENARIOS)
    with pytest.raises(SystemExit) as stop:
        main(["chaos", "--config", "missing.yaml"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "missing.yaml" in err[0]
