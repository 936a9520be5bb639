"""The NVIDIA modelopt backend: a generated ``QuantModule`` per spec, registered for the target class.

modelopt converts a module by swapping its class and calling ``_setup``; ours unfuses there, and
modelopt's recursive replacement then turns every per-expert ``nn.Linear`` into a ``QuantLinear``
with its own weight and input quantizers. An existing registration for the class (modelopt's own
wrappers for GptOss, Llama4, DBRX) is replaced, since those quantize through a different layout.
"""

from __future__ import annotations

from ..errors import SpecError
from ..hookspecs import hookimpl

KEY_PREFIX = "moe_unfuse."


class ModeloptBackend:
    name = "modelopt"

    def __init__(self) -> None:
        self._classes: dict[type, type] = {}

    def quant_class(self, spec) -> type:
        """The dynamic-module base modelopt combines with the target class: unfuse in ``_setup``."""
        from modelopt.torch.quantization.nn import QuantModule

        from ..experts import UnfusedExpertsMixin
        from ..unfusing import apply_plan, build_plan

        def _setup(self) -> None:
            apply_plan(build_plan(self, spec, type(self).__name__), swap_class=False)

        return type(f"_QuantUnfused{spec.class_name}", (UnfusedExpertsMixin, QuantModule), {"_setup": _setup, "_moe_unfuse_spec": spec, "__module__": __name__})

    @staticmethod
    def _register_linear_exact() -> None:
        """``LinearExact`` overrides ``forward``, so modelopt's nn.Linear entry does not match it;
        register it with the same ``_QuantLinear`` (whose forward quantizes input and weight, then
        calls ours)."""
        from modelopt.torch.quantization.nn import QuantModuleRegistry
        from modelopt.torch.quantization.nn.modules.quant_linear import _QuantLinear

        from ..experts import LinearExact

        if LinearExact not in QuantModuleRegistry._registry:
            QuantModuleRegistry.register({LinearExact: f"{KEY_PREFIX}LinearExact"})(_QuantLinear)

    def register(self, spec) -> type:
        """Register ``spec``'s class with modelopt; harmless when already registered by us."""
        from modelopt.torch.quantization.nn import QuantModuleRegistry

        self._register_linear_exact()
        cls = spec.resolve_class()
        if cls is None:
            raise SpecError(spec.source, "target.class", f"{spec.target_class} is not in the installed transformers", "install a transformers version listed in target.verified_on")
        if cls in self._classes and QuantModuleRegistry._registry.get(cls) is self._classes[cls]:
            return self._classes[cls]
        if cls in QuantModuleRegistry._registry:
            QuantModuleRegistry.unregister(cls)
        dm_cls = self.quant_class(spec)
        QuantModuleRegistry.register({cls: f"{KEY_PREFIX}{cls.__name__}"})(dm_cls)
        self._classes[cls] = dm_cls
        return dm_cls


backend = ModeloptBackend()


@hookimpl
def register_backends(register):
    register("modelopt", backend)
