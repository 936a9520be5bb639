"""Shared fixtures, and ``pytest --arch gemma4[,mixtral]`` to run only the tests marked for those architectures.

Fixtures: ``mutated_spec`` (a built-in spec with an edit: its mapping, a file, or a parsed ``Spec``),
``tiny_model`` (a whole tiny transformers model from a ``golden.model`` mapping), ``registered_plugin``
(a plugin registered for one test), ``gemma4_spec`` and ``one_thread``. The plain helpers that
parametrization needs at import time are in ``helpers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest
from helpers import SPECS_DIR, Edit, spec_names, spec_raw, spec_variant, write_spec

if TYPE_CHECKING:
    from torch import nn

    import moe_unfuse

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Third-party plugins installed on the machine must not change what the suite sees.
os.environ.setdefault("MOE_UNFUSE_NO_ENTRY_POINTS", "1")
# quantize evaluates what it wrote by default; the suite's hundreds of quantize runs are about the
# export, and tests/test_evaluate.py runs the evaluation itself (with --eval-size).
os.environ.setdefault("MOE_UNFUSE_EVAL_SIZE", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy CPU OpenMP's spinning workers
    made the quantize/export tests 4x slower; one thread for the module, restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- specs ----------------------------------------------------------------------------------------


class SpecMutator:
    """Variants of the built-in specs for one test, written (when a file is needed) into its ``tmp_path``.

    ``edit`` is a callable that changes the merged mapping in place (``extends`` already resolved).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def raw(self, arch: str, edit: Edit | None = None) -> dict:
        """The merged mapping of ``arch``'s spec, a private copy, with ``edit`` applied."""
        return spec_raw(arch, edit)

    def write(self, data: dict | str | bytes, name: str = "broken.yaml") -> Path:
        """``data`` written as a spec file in the test's directory."""
        return write_spec(self.directory, data, name)

    def path(self, arch: str, edit: Edit | None = None, name: str = "broken.yaml") -> Path:
        """``arch``'s spec with ``edit`` applied, written as a file (for errors that name the file)."""
        return self.write(self.raw(arch, edit), name)

    def load(self, arch: str, edit: Edit | None = None, name: str = "broken.yaml", **kwargs: Any) -> moe_unfuse.Spec:
        """``arch``'s spec with ``edit`` applied, written and loaded with ``load_spec`` (every load-time check)."""
        from moe_unfuse import load_spec

        return load_spec(self.path(arch, edit, name), (SPECS_DIR,), **kwargs)

    def parse(self, arch: str, edit: Edit | None = None, source: str | None = None) -> moe_unfuse.Spec:
        """``arch``'s spec with ``edit`` applied, parsed in memory (no file)."""
        return spec_variant(arch, edit, source)


@pytest.fixture
def mutated_spec(tmp_path: Path) -> SpecMutator:
    """Build a broken or varied spec from a built-in one: ``mutated_spec.load("gemma4", edit)``."""
    return SpecMutator(tmp_path)


@pytest.fixture
def gemma4_spec() -> moe_unfuse.Spec:
    """The built-in Gemma 4 spec (the reference spec), loaded when a test asks for it, not at import."""
    import moe_unfuse

    return moe_unfuse.get_spec("gemma4")


# --- models ---------------------------------------------------------------------------------------


def build_tiny_model(
    model_def: Mapping[str, Any], seed: int | None = None, expert_std: float | None = None, **overrides: Any
) -> nn.Module:
    """A whole tiny model from a ``golden.model`` mapping (``class``, optional ``config``,
    ``config_kwargs`` updated by ``overrides``): eager attention and experts, seeded, in eval mode.
    ``expert_std`` redraws every expert parameter from N(0, std): the default init leaves experts
    at a scale where they barely change the logits."""
    import torch

    from moe_unfuse.tools import golden

    cls = golden.import_object(model_def["class"])
    config_cls = golden.import_object(model_def["config"]) if model_def.get("config") else cls.config_class
    config = config_cls(**{**model_def["config_kwargs"], **overrides})
    for cfg in (config, getattr(config, "text_config", None), getattr(config, "ffn_config", None)):
        if cfg is not None:
            cfg._experts_implementation = "eager"  # the reference forward every exactness claim is about
    config._attn_implementation = "eager"
    torch.manual_seed(golden.SEED if seed is None else seed)
    model = cls(config).eval()
    if expert_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name:
                    p.normal_(0, expert_std)
    return model


@pytest.fixture
def tiny_model() -> Callable[..., nn.Module]:
    """``tiny_model(arch_or_model_def, seed=None, expert_std=None, **config_overrides)``: a whole tiny
    model, from the arch's ``golden.model`` or from a given model mapping (see :func:`build_tiny_model`)."""
    import moe_unfuse

    def build(model: str | Mapping[str, Any], **kwargs: Any) -> nn.Module:
        model_def = moe_unfuse.get_spec(model).golden["model"] if isinstance(model, str) else model
        return build_tiny_model(model_def, **kwargs)

    return build


# --- plugins --------------------------------------------------------------------------------------


@pytest.fixture
def registered_plugin() -> Iterator[Callable[..., Any]]:
    """``registered_plugin(obj, name=None)`` registers a plugin object for this test; every one still
    registered is unregistered afterwards, also when the test fails, so no plugin leaks into the next."""
    import moe_unfuse
    from moe_unfuse.plugins.manager import is_registered

    registered: list[Any] = []

    def register(plugin: Any, name: str | None = None) -> Any:
        registered.append(plugin)
        moe_unfuse.register_plugin(plugin, name=name)
        return plugin

    yield register
    for plugin in reversed(registered):
        if is_registered(plugin):
            moe_unfuse.unregister_plugin(plugin)


# --- --arch ---------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--arch",
        action="store",
        default=None,
        help="comma-separated arch names: run only their tests (see `moe-unfuse list`)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "arch(name): the test exercises one architecture's spec")
    wanted = config.getoption("--arch")
    if wanted:
        known = spec_names()
        if any(a not in known for a in wanted.split(",")):  # maybe a spec from an installed plugin: ask the registry
            import moe_unfuse

            known = list(dict.fromkeys([*known, *moe_unfuse.list_specs()]))
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
