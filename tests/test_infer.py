"""``moe-unfuse draft``: a drafted spec must be as good as the hand-written one.

For every class the installed transformers decorates with ``use_experts_implementation`` (found by
scanning its modeling sources), the spec inferred from the class, given the golden section of the
hand-written spec, passes the golden checks: bit-exact against eager in fp32 and bf16, close to
grouped_mm/batched_mm, refuse bit-exact, whole-model logits unchanged. The modelopt check is left
out here (``run_golden(modelopt=False)``): it exercises register + mtq.quantize, which run the same
plan as the exact check, and it costs twice the rest; test_golden.py runs it for every spec.
"""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers import decorated_classes, spec_names, spec_raw

import moe_unfuse
from moe_unfuse.base.errors import MoeUnfuseError
from moe_unfuse.cli.main import main
from moe_unfuse.spec.model import parse
from moe_unfuse.tools import golden
from moe_unfuse.tools.draft import draft as draft_spec
from moe_unfuse.tools.draft import import_target, is_decorated


def _cases() -> list:
    """One case per decorated class, with the arch of the spec targeting it (read from the spec
    files' mappings: the Spec is loaded by the test)."""
    arch_by_class = {spec_raw(arch)["target"]["class"]: arch for arch in spec_names()}
    cases = []
    for path in decorated_classes():
        arch = arch_by_class.get(path)
        if arch is None or not spec_raw(arch).get("golden"):
            # test_decorated_coverage.py fails for a decorated class with neither a spec nor a listed reason
            cases.append(
                pytest.param(
                    path,
                    None,
                    id=path.rsplit(".", 1)[1],
                    marks=pytest.mark.skip(reason="no hand-written spec with a golden config"),
                )
            )
        else:
            cases.append(pytest.param(path, arch, id=arch, marks=pytest.mark.arch(arch)))
    return cases


def test_the_source_scan_finds_the_decorated_classes():
    paths = decorated_classes()
    assert "transformers.models.mixtral.modeling_mixtral.MixtralExperts" in paths
    assert "transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts" in paths
    assert "transformers.models.step3p7.modeling_step3p7.Step3p7Experts" not in paths  # undecorated
    assert all(is_decorated(import_target(p)[0]) for p in paths[:5])


@pytest.mark.parametrize(("path", "arch"), _cases())
def test_inferred_spec_passes_golden(path, arch):
    spec = moe_unfuse.get_spec(arch)
    (cls,) = import_target(path)
    assert is_decorated(cls)
    draft = draft_spec(cls, module_kwargs=spec.golden.get("module_kwargs"))
    assert draft.complete, draft.notes
    raw = copy.deepcopy(draft.spec)
    raw["golden"] = copy.deepcopy(dict(spec.golden))
    inferred = parse(raw, f"<inferred from {path}>")
    results = golden.run_golden(inferred, modelopt=False)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert not failed, "; ".join(failed)
    assert {r.name for r in results} >= {"exact-float32", "exact-bfloat16", "fuse", "fuse-copied"}


def test_inferred_spec_reads_what_differs_from_the_standard_layout():
    """Each non-standard flag and forward detail lands in the draft (compared to the real classes)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
    from transformers.models.openai_privacy_filter.modeling_openai_privacy_filter import OpenAIPrivacyFilterExperts

    gpt = draft_spec(GptOssExperts).spec
    assert gpt["params"]["gate_up_proj"] == {
        "axes": ["expert", "in", "out"],
        "shape": ["num_experts", "hidden", "2*intermediate"],
        "into": ["gate_proj", "up_proj"],
        "packing": "interleaved",
        "bias": "gate_up_proj_bias",
    }
    assert gpt["gate"] == {"kind": "module_method", "method": "_apply_gate"}
    assert gpt["linear"] == {"bias": "after_matmul"}
    assert gpt["forward"]["args"] == {
        "hidden_states": "hidden_states",
        "router_indices": "top_k_index",
        "routing_weights": "top_k_weights",
    }
    opf = draft_spec(OpenAIPrivacyFilterExperts).spec
    assert (
        opf["linear"] == {"bias": "after_matmul", "compute_dtype": "float32"}
        and opf["forward"]["accumulate"] == "float32"
    )
    nem = draft_spec(NemotronHExperts).spec
    assert nem["gate"] == {"kind": "none"} and list(nem["params"]) == ["up_proj", "down_proj"]
    assert nem["forward"]["accumulate"] == "top_k_weights"


def test_undecided_points_are_reported():
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    draft = draft_spec(Llama4TextExperts)
    assert not draft.complete
    assert any("undecorated" in n for n in draft.notes)
    assert any("forward(hidden_states)" in n and "forward kind" in n for n in draft.notes)
    text = draft.to_yaml()
    assert "# Could not decide" in text and "forward(hidden_states)" in text
    assert "forward" not in yaml.safe_load(text)  # left out rather than guessed


def test_a_module_path_drafts_each_experts_class_with_its_own_config():
    drafts = [draft_spec(cls) for cls in import_target("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")]
    configs = {d.cls.__name__: d.spec["golden"]["config"] for d in drafts}
    assert configs == {
        "Qwen3OmniMoeThinkerTextExperts": "transformers.Qwen3OmniMoeTextConfig",
        "Qwen3OmniMoeTalkerTextExperts": "transformers.Qwen3OmniMoeTalkerTextConfig",
    }


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("transformers.models.mixtral.modeling_mixtral.NoSuchExperts", "has no class 'NoSuchExperts'"),
        ("no_such_package.module.Experts", "cannot import module 'no_such_package.module'"),
        ("transformers.models.jetmoe.modeling_jetmoe.JetMoeParallelExperts", "cannot build an instance from a config"),
    ],
)
def test_bad_targets_fail_in_one_line(path, message):
    with pytest.raises(MoeUnfuseError) as err:
        for cls in import_target(path):
            draft_spec(cls)
    assert message in str(err.value) and "fix:" in str(err.value) and "\n" not in str(err.value)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """``moe-unfuse infer ARGS`` through the real CLI entry point: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(["draft", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_a_spec_that_loads_and_matches_the_hand_written_one(tmp_path, capsys):
    code, stdout, stderr = _cli(capsys, "transformers.models.mixtral.modeling_mixtral.MixtralExperts")
    assert code == 0, stderr
    path = tmp_path / "mixtral.yaml"
    path.write_text(stdout)
    drafted = moe_unfuse.load_spec(path)
    hand = moe_unfuse.get_spec("mixtral")
    for attr in ("target_class", "dims", "params", "activation", "gate", "forward_kind", "forward_args"):
        assert getattr(drafted, attr) == getattr(hand, attr), attr


def test_cli_reports_undecided_points_on_stderr_and_exit_status(tmp_path, capsys):
    code, _, stderr = _cli(
        capsys, "transformers.models.llama4.modeling_llama4.Llama4TextExperts", "--out", str(tmp_path)
    )
    assert code == 1
    assert "could not decide" in stderr and "forward(hidden_states)" in stderr
    assert "# Could not decide" in (tmp_path / "llama4.yaml").read_text()
    code, _, stderr = _cli(
        capsys, "transformers.models.mixtral.modeling_mixtral.MixtralExperts", "--config-kwargs", "{oops"
    )
    assert code == 2 and stderr.count("\n") == 1 and "--config-kwargs: not valid JSON" in stderr
