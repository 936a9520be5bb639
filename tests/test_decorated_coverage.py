"""Every fused-experts class the installed transformers decorates with ``use_experts_implementation``
has a spec, or is listed below with the reason it has none.

Without this, a decorated class no spec targets is only a skipped case in test_infer.py and a model
using it fails at quantize time. The classes are found by parsing transformers' modeling sources
(``helpers.decorated_classes``: about a second, where importing every modeling module takes far longer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from helpers import decorated_classes

import moe_unfuse

#: Decorated classes deliberately left without a spec: import path -> why. An entry that is no longer
#: decorated, or that a spec now covers, fails the test (so the list cannot go stale).
DELIBERATELY_UNCOVERED: dict[str, str] = {}


def coverage_problems(
    decorated: Iterable[str], specs: Iterable[moe_unfuse.Spec], deliberate: Mapping[str, str]
) -> list[str]:
    """What is wrong with the coverage of ``decorated`` (import paths) by ``specs`` (their
    ``target.class``, or a class name in ``match_names``), given the ``deliberate`` exceptions."""
    specs = list(specs)
    targets = {s.target_class for s in specs}
    names = {n for s in specs for n in s.match_names}
    decorated = list(decorated)

    def covered(path: str) -> bool:
        return path in targets or path.rsplit(".", 1)[1] in names

    problems = [
        f"{p}: no spec targets it; fix: add specs/NAME.yaml (`moe-unfuse infer {p}` drafts one) "
        "or list it in DELIBERATELY_UNCOVERED with the reason"
        for p in decorated
        if not covered(p) and p not in deliberate
    ]
    problems += [
        f"{p}: listed in DELIBERATELY_UNCOVERED but {'a spec covers it' if covered(p) else 'not decorated in the installed transformers'}; fix: remove the entry"
        for p in deliberate
        if covered(p) or p not in decorated
    ]
    problems += [
        f"{p}: listed in DELIBERATELY_UNCOVERED without a reason" for p, why in deliberate.items() if not why.strip()
    ]
    return problems


def test_every_decorated_class_has_a_spec_or_a_reason():
    decorated = decorated_classes()
    assert "transformers.models.mixtral.modeling_mixtral.MixtralExperts" in decorated and len(decorated) >= 60, (
        decorated
    )  # the scan works
    problems = coverage_problems(decorated, moe_unfuse.list_specs().values(), DELIBERATELY_UNCOVERED)
    assert not problems, "\n".join(problems)


def test_a_decorated_class_without_a_spec_is_reported(gemma4_spec):
    """The check itself bites: an unknown decorated class, a stale exception and a bare one are each named."""
    new = "transformers.models.newmoe.modeling_newmoe.NewMoeExperts"
    gemma = gemma4_spec.target_class
    problems = coverage_problems([gemma, new], [gemma4_spec], {})
    assert len(problems) == 1 and problems[0].startswith(f"{new}: no spec targets it"), problems
    assert coverage_problems([gemma, new], [gemma4_spec], {new: "remote code only"}) == []
    stale = coverage_problems([gemma], [gemma4_spec], {gemma: "x", new: "y"})
    assert (
        [p.split(":")[0] for p in stale] == [gemma, new]
        and "a spec covers it" in stale[0]
        and "not decorated" in stale[1]
    ), stale
    assert coverage_problems([new], [], {new: " "}) == [f"{new}: listed in DELIBERATELY_UNCOVERED without a reason"]
