"""pytest fixtures shared by every test module, and the skip policy CI enforces."""

import os

import pytest
import torch

from helpers import ALLOWED_SKIP_REASONS


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_sessionfinish(session, exitstatus):
    """With BINDWEAVE_STRICT_SKIPS=1 (CI), a skip whose reason is not on the allowed list fails the run:
    a skipped fidelity test must never pass for coverage."""
    if os.environ.get("BINDWEAVE_STRICT_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    bad = sorted({f"{r.nodeid}: {_skip_reason(r)}" for r in skipped
                  if not _skip_reason(r).startswith(ALLOWED_SKIP_REASONS)})
    if bad:
        reporter.ensure_newline()
        reporter.write_line("skips outside the allowed list (" + "; ".join(ALLOWED_SKIP_REASONS) + "):", red=True)
        for line in bad:
            reporter.write_line("  " + line, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
