"""What :func:`moe_unfuse.quant.export.export_checkpoint` runs modelopt's ``export_hf_checkpoint``
under: the warnings that say nothing silenced (:func:`quiet`, which other modelopt and transformers
runs use too), and, for the export's duration only, modelopt patched where it would write what the
checkpoint must not hold (source tensors of unfused experts, names the naming contract lacks) and the
model's device reported where every module is offloaded.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from torch import nn

from ..core.offload import input_device
from ..hub.naming import NamingContract
from .streaming import has_split_rules


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the warnings modelopt and transformers print on every run that say nothing about this one
    (untested-version notice, torch_dtype deprecation, tensor copy-construct)."""
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        for message in (
            "transformers .* is not tested",
            "To copy construct from a tensor",
            ".*torch_dtype.* is deprecated",
        ):
            warnings.filterwarnings("ignore", message=message)
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)


@contextmanager
def no_carried_expert_sources(contract: NamingContract) -> Iterator[None]:
    """modelopt 0.48 copies source-checkpoint tensors the model has no parameter for (meant for MTP
    heads) into the export verbatim (``read_unplaced_weights``). Once experts are unfused, their
    source tensors look like such: the bf16 fused tensors would land next to the quantized
    per-expert ones (or, where the hub is per expert, over them). Its ``unplaced_keys_for`` decides
    what is carried and excluded; for the export's duration it leaves out every source key of an
    unfused experts module. On modelopt 0.47, which has no such step, this does nothing."""
    try:
        from modelopt.torch.export import unified_export_hf as exporter
    except ImportError:  # pragma: no cover - modelopt is a dependency
        yield
        return
    original = getattr(exporter, "unplaced_keys_for", None)
    if original is None:
        yield
        return

    def unplaced_keys_for(model: nn.Module, ckpt: Any) -> list[str]:
        return [k for k in original(model, ckpt) if not contract.expert_owned(k)]

    exporter.unplaced_keys_for = unplaced_keys_for
    try:
        yield
    finally:
        exporter.unplaced_keys_for = original


def _modelopt_names_disagree(model: nn.Module, contract: NamingContract) -> bool:
    """Whether modelopt's quant-aware reverse conversion would write a name the naming contract lacks
    for a tensor the contract names. It renames with ``re.sub`` (every occurrence) where transformers
    renames the first (HY-V4: ``hc_pre.hc_head.hc_pre.hc_head_base``), and applies renames meant for
    hub per-expert modules to per-expert names of fused ones (HY-V4 ``experts.E.linear_gate``)."""
    try:
        from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper
    except ImportError:  # pragma: no cover - modelopt is a dependency
        return False
    try:
        try:
            mapper = build_reverse_name_mapper(model, tensor_keys=True)  # modelopt 0.48
        except TypeError:
            mapper = build_reverse_name_mapper(model)
    except Exception:  # noqa: BLE001 - modelopt cannot reverse it: it falls back to in-memory names itself
        return False
    if mapper is None:
        return False
    for name, _ in model.named_parameters():
        ours = contract.hub_key(name)
        if contract.base(ours) is not None and contract.base(mapper(name)) is None:
            return True
    return False


@contextmanager
def own_names_when_modelopt_disagrees(model: nn.Module, contract: NamingContract) -> Iterator[None]:
    """For the export's duration, modelopt's reverse conversion is off when it would write names
    the contract lacks (:func:`_modelopt_names_disagree`) or the conversion mapping has split or
    merge rules (which the layer-by-layer export cannot hand modelopt: both paths then name them
    alike): it writes the in-memory names for weights and config alike, as on its own fallback, and
    :func:`~moe_unfuse.quant.postprocess.postprocess_checkpoint` names every key through the contract (transformers' own reverse)."""
    if not (has_split_rules(model) or _modelopt_names_disagree(model, contract)):
        yield
        return
    import importlib

    patched = []
    for module in ("unified_export_hf", "unified_export_hf_streaming", "quant_aware_conversion"):
        try:
            mod = importlib.import_module(f"modelopt.torch.export.{module}")
        except ImportError:  # pragma: no cover - modelopt is a dependency
            continue
        for attr, stand_in in (
            ("build_reverse_name_mapper", lambda model, **kwargs: None),
            ("revert_weight_conversion_quant_aware", lambda model, state_dict: state_dict),
        ):
            if hasattr(mod, attr):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, stand_in)
    try:
        yield
    finally:
        for mod, attr, original in patched:
            setattr(mod, attr, original)


@contextmanager
def device_when_offloaded(model: nn.Module) -> Iterator[None]:
    """modelopt's export runs a dummy forward on ``model.device``: the first parameter's device, which
    is ``meta`` when every module is offloaded to disk (layer by layer). For the export's duration the
    model reports the device its offloaded modules run on instead (a same-named subclass, so the
    class name modelopt and ``save_pretrained`` write is unchanged)."""
    first = next(model.parameters(), None)
    if first is None or not first.is_meta:
        yield
        return
    cls = type(model)
    device = input_device(model)
    model.__class__ = type(
        cls.__name__, (cls,), {"device": property(lambda self: device), "__module__": cls.__module__}
    )
    try:
        yield
    finally:
        model.__class__ = cls
