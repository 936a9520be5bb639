"""``pytest --arch gemma4[,mixtral]`` runs only the tests marked for those architectures."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU OpenMP's spinning workers
    made the quantize/export tests 4x slower; one thread for the module, restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--arch", action="store", default=None, help="comma-separated arch names: run only their tests (see `moe-unfuse list`)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "arch(name): the test exercises one architecture's spec")
    wanted = config.getoption("--arch")
    if wanted:
        import moe_unfuse

        known = list(moe_unfuse.list_specs())
        unknown = [a for a in wanted.split(",") if a not in known]
        if unknown:
            raise pytest.UsageError(f"--arch: unknown arch {', '.join(unknown)}; known: {', '.join(known)}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("--arch")
    if not wanted:
        return
    selected = set(wanted.split(","))
    keep, drop = [], []
    for item in items:
        archs = {m.args[0] for m in item.iter_markers("arch")}
        (keep if archs & selected else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
