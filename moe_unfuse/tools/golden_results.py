"""A pytest plugin that records each arch's test outcomes, for ``moe-unfuse coverage --results``.

    pytest -p moe_unfuse.tools.golden_results --golden-results golden.json
    moe-unfuse coverage --results golden.json --markdown

Every test marked ``arch(NAME)`` (the golden tests, the draft tests, ...) counts for its arch; the
file also records the transformers and torch versions the run used, so a status is never
separated from where it was measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ..base.errors import MoeUnfuseError

_OUTCOMES: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--golden-results",
        metavar="FILE",
        default=None,
        help="write each arch's test outcomes to FILE (JSON) for moe-unfuse coverage --results",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    _OUTCOMES.clear()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    archs = getattr(report, "_moe_unfuse_archs", None)
    if not archs:
        return
    if report.when != "call" and not (report.skipped or report.failed):
        return
    outcome = "skipped" if report.skipped else "failed" if report.failed else "passed"
    for arch in archs:
        entry = _OUTCOMES.setdefault(arch, {"passed": 0, "failed": [], "skipped": 0})
        if outcome == "failed":
            entry["failed"].append(report.nodeid.split("::", 1)[-1])
        else:
            entry[outcome] += 1


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    outcome.get_result()._moe_unfuse_archs = sorted({m.args[0] for m in item.iter_markers("arch")})


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = session.config.getoption("--golden-results")
    if not path:
        return
    import torch
    import transformers

    data = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "archs": dict(sorted(_OUTCOMES.items())),
    }
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    """A results file written by this plugin; one-line errors for anything else."""

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise MoeUnfuseError(
            f"{path}: cannot be read ({exc.strerror}); fix: write it with pytest -p moe_unfuse.tools.golden_results --golden-results {path}"
        ) from None
    except json.JSONDecodeError as exc:
        raise MoeUnfuseError(
            f"{path}: not JSON ({exc.msg}, line {exc.lineno}); fix: write it with pytest -p moe_unfuse.tools.golden_results --golden-results {path}"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("archs"), dict):
        raise MoeUnfuseError(
            f"{path}: no 'archs' mapping, not a golden results file; fix: write it with pytest -p moe_unfuse.tools.golden_results --golden-results {path}"
        )
    return data
