"""The NVIDIA modelopt backend: a generated ``QuantModule`` per spec, registered for the target class.

modelopt converts a module by swapping its class and calling ``_setup``; ours unfuses there and
turns every per-expert ``nn.Linear`` into a ``QuantLinear`` with its own weight and input quantizers
in bulk (:func:`moe_unfuse.quant.fastquant.convert_linears`: what modelopt's recursive replacement, which
then finds them converted, would have made one by one), and a post-conversion plugin gives them a
weight callback that quantizes each expert weight once (:mod:`moe_unfuse.quant.fastquant`). An existing registration for the class (modelopt's own
wrappers for GptOss, Llama4, DBRX) is replaced, since those quantize through a different layout.

modelopt's export dispatches MoE modules through two registries that guess the experts' structure
from class names (``get_expert_linear_names`` falls back to Mixtral's ``w1/w2/w3``; GptOss and
Llama4 experts are exported as fused bmm weights). An unfused experts module declares its own
projections, so handlers keyed on :class:`UnfusedExpertsMixin` go first in both: input amax
fallback over the spec's projections, and no fused-weight export (its per-expert QuantLinears are
exported by modelopt's own linear handler as the walk reaches them).
"""

from __future__ import annotations

from ..plugin import SpecError, hookimpl

# torch, modelopt and the unfused module's API are imported where used: registering the backend
# (every ``moe-unfuse`` command, ``list`` and ``--help`` included, loads the plugins) imports none.

KEY_PREFIX = "moe_unfuse."


class ModeloptBackend:
    name = "modelopt"

    def __init__(self) -> None:
        self._classes: dict[type, type] = {}

    def quant_class(self, spec) -> type:
        """The dynamic-module base modelopt combines with the target class: unfuse in ``_setup``."""
        from modelopt.torch.quantization.nn import QuantModule
        from torch import nn

        from ..plugin import UnfusedExpertsMixin, apply_plan, build_plan, convert_linears

        def _setup(self) -> None:
            apply_plan(build_plan(self, spec, type(self).__name__), swap_class=False)
            # converted here in bulk; modelopt's recursive replacement then finds them converted
            convert_linears([m for expert in self for m in expert.modules() if isinstance(m, nn.Linear)])

        return type(
            f"_QuantUnfused{spec.class_name}",
            (UnfusedExpertsMixin, QuantModule),
            {"_setup": _setup, "_moe_unfuse_spec": spec, "__module__": __name__},
        )

    @staticmethod
    def _register_linear_exact() -> None:
        """``LinearExact`` overrides ``forward``, so modelopt's nn.Linear entry does not match it;
        register it with the same ``_QuantLinear`` (whose forward quantizes input and weight, then
        calls ours)."""
        from modelopt.torch.quantization.nn import QuantModuleRegistry
        from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear

        from ..plugin import LinearExact

        if LinearExact not in QuantModuleRegistry._registry:
            QuantModuleRegistry.register({LinearExact: f"{KEY_PREFIX}LinearExact"})(_QuantLinear)

    @staticmethod
    def prepare_export() -> None:
        """Make modelopt's export write unfused experts (its export registries; idempotent)."""
        install_export_handlers()

    def register(self, spec) -> type:
        """Register ``spec``'s class with modelopt; harmless when already registered by us."""
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        from ..plugin import install_fast_conversion

        self._register_linear_exact()
        install_export_handlers()
        install_fast_conversion()
        cls = spec.resolve_class()
        if cls is None:
            raise SpecError(
                spec.source,
                "target.class",
                f"{spec.target_class} is not in the installed transformers",
                "install a transformers version listed in target.verified_on",
            )
        known = self._classes.get(cls)
        if known is not None and QuantModuleRegistry._registry.get(cls) is known and known._moe_unfuse_spec == spec:
            return known  # the same spec again; an edited spec for the class replaces the registration
        if cls in QuantModuleRegistry._registry:
            QuantModuleRegistry.unregister(cls)
        dm_cls = self.quant_class(spec)
        QuantModuleRegistry.register({cls: f"{KEY_PREFIX}{cls.__name__}"})(dm_cls)
        self._classes[cls] = dm_cls
        return dm_cls


def _prepare_unfused_experts(name: str, moe_block, ctx) -> None:
    """Give expert input quantizers calibration never reached the max of their siblings (modelopt's
    own fallback), per projection the spec declares."""
    from modelopt.torch.export.layer_utils import set_expert_quantizer_amax

    from ..plugin import unfuse_state

    experts = moe_block.experts
    for proj in unfuse_state(experts).spec.projection_names():
        linears = [getattr(expert, proj) for expert in experts]
        set_expert_quantizer_amax(modules=linears, quantizer_attrs=["input_quantizer"])


def _export_unfused_experts(name: str, module, ctx) -> None:
    """Nothing to pack on the container (its per-expert QuantLinears are exported one by one), but
    every per-expert tensor the export keeps as is must own its storage: safetensors refuses tensors
    that share memory (the gate and up biases of an interleaved fused bias) or views that cannot be
    flattened (a transposed layout). Weights modelopt packs are replaced by it anyway; the rest
    (biases, unquantized experts) get a contiguous copy. Called once per experts module, i.e. once
    per decoder layer of a streamed (offloaded) export: the previous layer's freed heap goes back to
    the system first (:func:`release_free_memory`)."""
    import torch

    from ..plugin import release_free_memory

    release_free_memory()

    for linear in module.modules():
        if not isinstance(linear, torch.nn.Linear):
            continue
        quantizer = getattr(linear, "weight_quantizer", None)
        packed = quantizer is not None and quantizer.is_enabled
        for pname, p in list(linear._parameters.items()):
            if p is None or (pname == "weight" and packed):
                continue
            linear._parameters[pname] = torch.nn.Parameter(
                p.detach().clone(memory_format=torch.contiguous_format), requires_grad=False
            )


_handlers_installed = False


def install_export_handlers() -> None:
    """Put the unfused-experts handlers first in modelopt's export registries (idempotent)."""
    global _handlers_installed
    if _handlers_installed:
        return
    from modelopt.torch.export.registry import ExportModuleRegistry, PrepareMoEInputsRegistry

    from ..plugin import UnfusedExpertsMixin

    PrepareMoEInputsRegistry.register(UnfusedExpertsMixin, prepend=True)(_prepare_unfused_experts)
    ExportModuleRegistry.register(UnfusedExpertsMixin, prepend=True)(_export_unfused_experts)
    _handlers_installed = True


backend = ModeloptBackend()


@hookimpl
def register_backends(register):
    register("modelopt", backend)
