"""Version drift: a spec used with a transformers it was not verified on.

The versions are simulated, so these tests pass on whichever transformers is installed: the
specs under test list ``VERIFIED`` in ``verified_on``, and the installed version string is
monkeypatched to ``VERIFIED`` or to ``FUTURE`` (outside it). The target class is replaced by real
transformers classes changed the way a release could change them (a parameter renamed or
reshaped, the forward's arguments renamed, the class removed). Each must give one DriftError line
naming the spec, what no longer fits and the fix; an unchanged class must keep working.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from helpers import spec_raw
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import moe_unfuse
from moe_unfuse.base import versions
from moe_unfuse.base.errors import SpecError
from moe_unfuse.core import drift
from moe_unfuse.core.drift import DriftError
from moe_unfuse.spec.golden_config import golden_config
from moe_unfuse.spec.model import parse
from moe_unfuse.tools import golden

FAKE = "moe_unfuse_drift_fake"
VERIFIED = "1.2.3"  # the version the simulated specs were verified on
FUTURE = "99.0.0"


class RenamedExperts(MixtralExperts):
    """A release that renamed gate_up_proj to w13."""

    def __init__(self, config):
        super().__init__(config)
        self.w13 = self.gate_up_proj
        del self.gate_up_proj


class TransposedExperts(MixtralExperts):
    """A release that stores gate_up_proj transposed, [E, H, 2I]."""

    def __init__(self, config):
        super().__init__(config)
        self.gate_up_proj = nn.Parameter(self.gate_up_proj.detach().transpose(1, 2).contiguous())


class RenamedArgsExperts(MixtralExperts):
    """A release that renamed the forward's routing arguments (as GPT-OSS names them)."""

    def forward(self, hidden_states, router_indices, routing_weights):
        return super().forward(hidden_states, router_indices, routing_weights)


class SameExperts(MixtralExperts):
    """A release that changed nothing the spec relies on."""


@pytest.fixture
def fake_module(monkeypatch):
    mod = types.ModuleType(FAKE)
    for cls in (RenamedExperts, TransposedExperts, RenamedArgsExperts, SameExperts):
        setattr(mod, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, FAKE, mod)
    drift._CHECKED.clear()
    yield mod
    drift._CHECKED.clear()


@pytest.fixture
def future(monkeypatch):
    """The installed transformers is one the specs were not verified on."""
    monkeypatch.setattr(versions, "installed_version", lambda: FUTURE)
    drift._CHECKED.clear()


@pytest.fixture
def verified(monkeypatch):
    """The installed transformers is the one the simulated specs were verified on."""
    monkeypatch.setattr(versions, "installed_version", lambda: VERIFIED)
    drift._CHECKED.clear()


def mixtral_raw(target: str) -> dict:
    """The mixtral spec's mapping, pointed at ``target`` and verified on ``VERIFIED`` only."""
    return spec_raw(
        "mixtral", lambda r: r["target"].update({"class": target, "verified_on": {"transformers": [VERIFIED]}})
    )


def spec_for(class_name: str) -> moe_unfuse.Spec:
    """The mixtral spec, pointed at another class (verified on ``VERIFIED``)."""
    return parse(mixtral_raw(f"{FAKE}.{class_name}"), f"specs/drifted_{class_name.lower()}.yaml")


def assert_one_line(err: Exception, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for part in [f"transformers {FUTURE} is not in target.verified_on ({VERIFIED}) and ", "fix:", *parts]:
        assert part in msg, msg
    assert " changed:" not in msg, msg  # the spec is what no longer fits; the class is just what is installed


def test_verified_version_needs_no_check(monkeypatch):
    spec = moe_unfuse.get_spec("mixtral")
    monkeypatch.setattr(versions, "installed_version", lambda: versions.verified_versions(spec)[-1])
    assert versions.is_verified(spec) and not versions.is_drifted(spec)
    drift.check(spec)  # no-op
    monkeypatch.setattr(versions, "installed_version", lambda: FUTURE)
    assert not versions.is_verified(spec) and versions.is_drifted(spec)


def test_unverified_version_with_an_unchanged_class_still_works(fake_module, future):
    spec = spec_for("SameExperts")
    assert not versions.is_verified(spec)
    assert drift.problems(spec) == []
    drift.check(spec)
    assert golden.check_exact(spec, torch.float32).ok
    for real in ("mixtral", "qwen3_moe", "gpt_oss", "nemotron_h"):
        assert drift.problems(moe_unfuse.get_spec(real)) == [], real


def test_renamed_parameter(fake_module, future):
    spec = spec_for("RenamedExperts")
    experts = RenamedExperts(golden_config(spec))
    with pytest.raises(DriftError) as err:
        moe_unfuse.unfuse(experts, spec, allow_uncovered=True)
    assert_one_line(
        err.value,
        spec.source,
        "params.gate_up_proj",
        "and the spec does not fit its RenamedExperts: ",
        "no parameter 'gate_up_proj'",
    )
    assert "gate_up_proj" not in dict(experts.named_parameters()) and "w13" in dict(
        experts.named_parameters()
    )  # untouched
    with pytest.raises(DriftError) as err:
        moe_unfuse.register(spec)
    assert_one_line(err.value, "no parameter 'gate_up_proj'")
    with pytest.raises(DriftError):
        golden.check_exact(spec, torch.float32)


def test_reshaped_parameter(fake_module, future):
    spec = spec_for("TransposedExperts")
    with pytest.raises(DriftError) as err:
        drift.check(spec)
    assert_one_line(
        err.value, "params.gate_up_proj.shape", "[4, 64, 80]", "[4, 80, 64]", "does not fit its TransposedExperts:"
    )


def test_renamed_forward_arguments(fake_module, future):
    spec = spec_for("RenamedArgsExperts")
    experts = RenamedArgsExperts(golden_config(spec))
    with pytest.raises(DriftError) as err:
        moe_unfuse.unfuse(experts, spec)
    assert_one_line(
        err.value,
        "forward.args",
        "forward(hidden_states, top_k_index, top_k_weights) is now forward(hidden_states, router_indices, routing_weights)",
    )
    with pytest.raises(DriftError):
        moe_unfuse.register(spec)


@pytest.mark.parametrize(
    ("target", "what"),
    [
        (f"{FAKE}.GoneExperts", f"{FAKE} has no class 'GoneExperts'"),
        ("moe_unfuse_no_such_module.MixtralExperts", "no module moe_unfuse_no_such_module (ModuleNotFoundError)"),
    ],
)
def test_missing_class_loads_but_fails_on_use(fake_module, future, target, what):
    spec = parse(mixtral_raw(target), "specs/gone.yaml")  # loading works: other specs stay usable
    assert spec.resolve_class() is None
    with pytest.raises(DriftError) as err:
        moe_unfuse.register(spec)
    assert_one_line(
        err.value,
        "specs/gone.yaml",
        "target.class",
        f"and has no {spec.class_name}: {what}",
        f"install transformers=={VERIFIED}",
    )


def test_on_a_verified_version_the_same_faults_are_spec_errors(fake_module, verified):
    """Drift is only claimed when the version is unverified; otherwise the spec is simply wrong."""
    with pytest.raises(SpecError) as err:
        parse(mixtral_raw(f"{FAKE}.GoneExperts"), "specs/typo.yaml")
    assert not isinstance(err.value, DriftError) and "has no class 'GoneExperts'" in str(err.value)
    spec = spec_for("RenamedExperts")
    with pytest.raises(SpecError) as err:
        moe_unfuse.unfuse(RenamedExperts(golden_config(spec)), spec, allow_uncovered=True)
    assert not isinstance(err.value, DriftError)


def test_check_command_reports_drift_in_one_line(fake_module, future, tmp_path, capsys):
    from argparse import ArgumentParser

    from moe_unfuse.cli.commands import check

    path = tmp_path / "drifted.yaml"
    path.write_text(
        f"extends: _standard\narch: drifted\ntarget:\n  class: {FAKE}.RenamedExperts\n  verified_on: {{transformers: ['{VERIFIED}']}}\n"
        "golden:\n  config: transformers.MixtralConfig\n  config_kwargs: {hidden_size: 64, intermediate_size: 40, num_local_experts: 4}\n"
    )
    with pytest.raises(DriftError) as err:
        parser = ArgumentParser()
        check.add_arguments(parser)
        check.run(parser.parse_args([str(path), "--no-modelopt"]))
    assert_one_line(err.value, str(path), "no parameter 'gate_up_proj'")


def test_a_spec_without_verified_on_is_not_drift(fake_module, future):
    """A draft that never passed its golden test: its faults are plain spec errors, found at load."""
    raw = spec_raw("mixtral", lambda r: r.update(target={"class": f"{FAKE}.GoneExperts"}))
    with pytest.raises(SpecError) as err:
        parse(raw, "specs/draft.yaml")
    assert not isinstance(err.value, DriftError) and "has no class 'GoneExperts'" in str(err.value)
