"""Nothing lost: an interrupted unfuse leaves every module fused; unfused models pickle, save and
deep-copy; Ctrl-C in a command is one line and exit status 130."""

from __future__ import annotations

import copy
import io
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import HANG_S

import moe_unfuse
from moe_unfuse.core import unfusing
from moe_unfuse.core.experts import UnfusedExpertsMixin
from moe_unfuse.tools import golden

PACKAGE = str(Path(moe_unfuse.__file__).parent)


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "classes": [type(m) for m in model.modules()],
        "params": {k: (id(v), v.clone()) for k, v in model.named_parameters()},
        "children": [list(m._modules) for m in model.modules()],
    }


def assert_fused_as_before(model: torch.nn.Module, snap: dict) -> None:
    assert [type(m) for m in model.modules()] == snap["classes"]
    assert [list(m._modules) for m in model.modules()] == snap["children"]
    params = dict(model.named_parameters())
    assert params.keys() == snap["params"].keys()
    for k, (ident, value) in snap["params"].items():
        assert id(params[k]) == ident and torch.equal(params[k], value), k
    assert not any("_moe_unfuse" in m.__dict__ or "_moe_unfuse_offloaded" in m.__dict__ for m in model.modules())


class Interrupt:
    """A KeyboardInterrupt at the ``at``-th line moe_unfuse executes inside ``_apply_plan``."""

    def __init__(self, at: int):
        self.at, self.count = at, 0

    def global_trace(self, frame, event, arg):
        return self.local_trace if frame.f_code.co_filename.startswith(PACKAGE) else None

    def local_trace(self, frame, event, arg):
        if event == "line":
            self.count += 1
            if self.count == self.at:
                raise KeyboardInterrupt
        return self.local_trace


def traced_apply(interrupt: Interrupt, real):
    def apply(plan, swap_class):
        sys.settrace(interrupt.global_trace)
        try:
            real(plan, swap_class)
        finally:
            sys.settrace(None)

    return apply


@pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.arch(a)) for a in ("gemma4", "gpt_oss", "dbrx", "longcat_flash")]
)
def test_an_interrupt_anywhere_in_unfuse_leaves_the_module_fused(monkeypatch, arch):
    spec = moe_unfuse.get_spec(arch)
    module = golden.build_experts(spec)
    args, kwargs = golden.make_inputs(module, spec)
    with torch.no_grad():
        before = module(*args, **kwargs)
    snap = snapshot(module)
    real = unfusing._apply_plan
    for _ in range(2):  # the second run counts the lines of one unfuse (the first fills caches)
        counter = Interrupt(at=0)
        monkeypatch.setattr(unfusing, "_apply_plan", traced_apply(counter, real))
        moe_unfuse.unfuse(module, spec)
        moe_unfuse.fuse(module)
    lines = counter.count
    assert lines > 50
    for at in range(1, lines + 1, max(1, lines // 150)):
        monkeypatch.setattr(unfusing, "_apply_plan", traced_apply(Interrupt(at), real))
        with pytest.raises(KeyboardInterrupt):
            moe_unfuse.unfuse(module, spec)
        assert_fused_as_before(module, snap)
    monkeypatch.setattr(unfusing, "_apply_plan", real)
    moe_unfuse.unfuse(module, spec)
    with torch.no_grad():
        assert torch.equal(module(*args, **kwargs), before)


@pytest.mark.arch("gemma4")
def test_an_interrupt_in_the_second_layer_restores_the_first(monkeypatch):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    spec = moe_unfuse.get_spec("gemma4")
    model = Gemma4ForCausalLM(Gemma4TextConfig(**spec.golden["model"]["config_kwargs"])).eval()
    snap = snapshot(model)
    calls = []
    real = unfusing._apply_plan

    def second_fails(plan, swap_class):
        calls.append(plan.path)
        real(plan, swap_class)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(unfusing, "_apply_plan", second_fails)
    with pytest.raises(KeyboardInterrupt):
        moe_unfuse.unfuse(model, "gemma4")
    assert len(calls) == 2
    assert_fused_as_before(model, snap)


def roundtrips():
    def saved(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": saved, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=pytest.mark.arch(a))
        for a in ("gemma4", "gpt_oss", "dbrx", "hy_v4", "jetmoe", "longcat_flash")
    ],
)
@pytest.mark.parametrize("how", list(roundtrips()))
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
def test_an_unfused_module_pickles_saves_and_deep_copies(arch, how, requires_grad):
    spec = moe_unfuse.get_spec(arch)
    module = golden.build_experts(spec)
    args, kwargs = golden.make_inputs(module, spec)
    moe_unfuse.unfuse(module, spec)
    for p in module.parameters():
        p.requires_grad_(requires_grad)
    with torch.no_grad():
        expected = module(*args, **kwargs)
    copied = roundtrips()[how](module)
    assert isinstance(copied, UnfusedExpertsMixin) and type(copied) is type(module)
    with torch.no_grad():
        assert torch.equal(copied(*args, **kwargs), expected)
    assert all(p.requires_grad == requires_grad for p in copied.parameters())
    fused = {k: v.clone() for k, v in copied._moe_unfuse.originals.items()}
    moe_unfuse.fuse(copied)
    assert all(torch.equal(dict(copied.named_parameters())[k], v) for k, v in fused.items())


@pytest.mark.arch("gemma4")
@pytest.mark.parametrize("how", list(roundtrips()))
def test_a_whole_unfused_model_pickles_saves_and_deep_copies(how):
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    spec = moe_unfuse.get_spec("gemma4")
    model = Gemma4ForCausalLM(Gemma4TextConfig(**spec.golden["model"]["config_kwargs"])).eval()
    moe_unfuse.unfuse(model, "gemma4")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(roundtrips()[how](model)(input_ids=ids).logits, expected)


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    from moe_unfuse.cli import main as cli
    from moe_unfuse.cli.commands import list as list_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(list_command, "run", interrupted)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave the test process's SIGINT alone
    assert cli.main(["list"]) == cli.INTERRUPTED == 130
    assert capsys.readouterr().err == "moe-unfuse list: interrupted\n"


def _default_sigint() -> None:
    """A child inherits an ignored or blocked SIGINT (a shell starts background jobs with SIGINT ignored:
    the suite run with ``&``), and Python then installs no KeyboardInterrupt handler: the default, as an
    interactive shell gives it."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.arch("gemma4")
def test_sigint_during_check_exits_130_with_one_line():
    proc = subprocess.Popen(
        # with the modelopt checks: seconds of work after the first line, so the signal lands mid-check
        [sys.executable, "-u", "-m", "moe_unfuse", "check", "gemma4"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    assert proc.stdout.readline().startswith("spec ok")  # in the golden checks now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "moe-unfuse check: interrupted" and "Traceback" not in err
