"""What the layer-by-layer path adds around modelopt so that a model offloaded to disk is walked,
calibrated and exported exactly as the whole model is. Each piece works around one named gap of
modelopt 0.47/0.48's layerwise walk and streaming export (``unified_export_hf_streaming``):

- **Decoder layers modelopt cannot find** (:func:`find_decoder_layers`): its discoverers know
  ``model.layers`` / ``model.language_model.layers`` with one layer class (and Nemotron-H). DBRX keeps
  its layers in ``transformer.blocks``; Jamba alternates two layer classes. A fallback registered with
  modelopt takes the one ``nn.ModuleList`` of the config's ``num_hidden_layers`` decoder layers, so
  calibration and the streaming export walk the same list.
- **A module that owns the decoder layers and tensors of its own** (:func:`owner_tensors_resident`;
  Zaya's residual scales, DeepSeek-OCR 2's and Unlimited-OCR's view separator): the streaming export
  gives such a module a window of its own after the layers, and modelopt's accelerate window loads the
  module *with every descendant*, so the layers' offloaded weights come back over their already
  packed NVFP4 weights (``Trying to set a tensor of shape [64, 64] in "weight" (which has shape
  [64, 32])``). Those few tensors are made resident for the export instead: no window is opened,
  and the export writes them with the model's other resident tensors.
- **A module that reads a child's weights without calling it** (:func:`materialized_forwards`): under
  offload, accelerate loads a module's weights only for its own forward. Llama 4's text model reads
  ``self.embed_tokens.weight.device`` before calling it; JetMoE's attention calls
  ``self.experts.reduce``, which adds the experts' bias outside their forward. In a layer-by-layer
  capture forward the other children of the module owning the decoder layers are materialized
  (:func:`owner_children_materialized`); in the export's dummy forward, those while the owner runs,
  and each decoder layer's whole subtree while it runs (:func:`materialized_forwards`).
- **Conversion mappings with split or merge rules** (:func:`names_reversed_later`; Bailing hybrid,
  GLM-5 next, Lara-Mini): modelopt's streaming export refuses them, since it renames one tensor at a
  time (and 0.48's mapper names every piece of a merge after the merged tensor, so they would
  overwrite each other). The tensors such rules touch are unquantized (a linear the hub stores inside a
  larger tensor stays unquantized: :func:`moe_unfuse.quant.quantize.quantize_model`), so for such a model
  the export writes every tensor under its in-memory name and moe_unfuse's post-processing reverses
  them one decoder layer at a time through transformers' own ``revert_weight_conversion``
  (:func:`moe_unfuse.quant.postprocess.postprocess_checkpoint`).
- **modelopt 0.47's streaming name mapper** (:func:`names_reversed_later`): 0.47 applies the mapper it
  builds for exclude patterns, with its ``\\x00`` sentinel segment, to tensor keys; Nemotron-H's reversed
  rename ``model.`` (an unescaped ``.``) rewrites the sentinel's ``modelo``, and its tensors come out as
  ``backbone.embeddings.weight.\\x00backbone.pt_name_sentinel``. Such a name keeps its in-memory name
  and the post-processing names it as above (0.48 maps tensor keys without a sentinel).
- **modelopt 0.48's exclude list of a streamed export** (:func:`quant_config_names_as_resident`): it is
  reversed against every module name, containers included, where the resident export uses the modules
  holding a weight, so a wildcard the reverse changes (DeepSeek-OCR 2's ``model.vision_tower*``)
  expands to other entries (``model.vision_tower``, not ``model.sam_model.patch_embed.proj`` ...).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from torch import nn

from ..core.offload import offload_hook


def find_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers from the config: the one ``nn.ModuleList`` (outermost) holding the text
    config's ``num_hidden_layers`` modules. Several such lists (a vision tower as deep as the
    decoder) are told apart by transformers' own ``_no_split_modules`` (its decoder layer classes);
    None when that leaves no single list."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    count = getattr(text, "num_hidden_layers", None)
    if not isinstance(count, int) or count <= 0:
        return None
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    outer = [(n, m) for n, m in lists if not any(n.startswith(f"{o}.") for o, _ in lists if o)]
    if len(outer) > 1:
        classes = set(getattr(model, "_no_split_modules", None) or ())
        outer = [(n, m) for n, m in outer if all(type(layer).__name__ in classes for layer in m)]
    return outer[0][1] if len(outer) == 1 else None


def _found(model: nn.Module) -> bool:
    return find_decoder_layers(model) is not None


def decoder_layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The model's decoder layers as modelopt's layerwise walk and streaming export find them, with
    :func:`find_decoder_layers` registered as its last discoverer (modelopt's own win where they apply)."""
    import modelopt.torch.quantization  # noqa: F401 - registers modelopt's own discoverers first
    from modelopt.torch.quantization.utils.layerwise_calib import LayerActivationCollector

    LayerActivationCollector.register_decoder_layer_support(_found, find_decoder_layers)
    return LayerActivationCollector.get_decoder_layers(model)


def _ancestors(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The modules on the path from ``model`` down to ``layers`` (both included)."""
    path = next(n for n, m in model.named_modules() if m is layers)
    out, node = [model], model
    for part in path.split(".") if path else ():
        node = getattr(node, part)
        out.append(node)
    return out


@contextmanager
def _materialized(module: nn.Module, recurse: bool) -> Iterator[None]:
    """``module``'s offloaded tensors (with ``recurse``, its whole subtree's) loaded and kept until
    the end: its hooks stop offloading (as modelopt's ``persistent_materialization`` does), and what
    this loaded is offloaded again. A module another materialization holds is left to it."""
    held = []
    for mod in module.modules() if recurse else (module,):
        hook = offload_hook(mod)
        if hook is None or not hook.offload:
            continue
        meta = any(t.is_meta for t in (*mod._parameters.values(), *mod._buffers.values()) if t is not None)
        if meta:
            hook.pre_forward(mod)
        hook.offload = False
        held.append((mod, hook, meta))
    try:
        yield
    finally:
        for mod, hook, loaded in held:
            hook.offload = True
            if loaded:
                hook.post_forward(mod, None)


@contextmanager
def owner_tensors_resident(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """The own tensors (not their children's) of every module above the decoder layers, loaded for
    the duration: the streaming export then opens no window on those modules (see the module docstring)."""
    with ExitStack() as stack:
        for module in _ancestors(model, layers):
            stack.enter_context(_materialized(module, recurse=False))
        yield


def _owner(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    return _ancestors(model, layers)[-2]


@contextmanager
def owner_children_materialized(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """The children of the module owning ``layers``, other than the layers, materialized for the
    duration (a capture forward: the owner may read one's weights without calling it, and the
    layers stand in, so this is the embeddings, norms and rotary tables)."""
    layers_owner = _owner(model, layers)
    with ExitStack() as stack:
        for child in layers_owner.children():
            if child is not layers:
                stack.enter_context(_materialized(child, recurse=True))
        yield


@contextmanager
def _during_forward(module: nn.Module, context: Callable[[], Any]) -> Iterator[None]:
    """``context()`` entered for each forward of ``module`` (and left when it returns or raises)."""
    stacks: list[ExitStack] = []

    def enter(_module: nn.Module, _args: Any) -> None:
        stack = ExitStack()
        stack.enter_context(context())
        stacks.append(stack)

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        if stacks:
            stacks.pop().close()

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while stacks:
            stacks.pop().close()


@contextmanager
def materialized_forwards(model: nn.Module, layers: nn.ModuleList) -> Iterator[None]:
    """For any forward of ``model`` (the export's dummy forward), what a module that reads a child's
    weights without calling it needs (see the module docstring): while the module owning ``layers``
    runs, its other children are materialized (:func:`owner_children_materialized`), and while a
    decoder layer runs, its whole subtree."""
    with ExitStack() as stack:
        stack.enter_context(_during_forward(_owner(model, layers), lambda: owner_children_materialized(model, layers)))
        for layer in layers:
            stack.enter_context(_during_forward(layer, lambda layer=layer: _materialized(layer, recurse=True)))
        yield


@contextmanager
def _replaced(owner: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    """``owner.name`` replaced by ``make(original)`` for the duration; untouched where it has none."""
    original = getattr(owner, name, None)
    if original is None:
        yield
        return
    setattr(owner, name, make(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


def has_split_rules(model: nn.Module) -> bool:
    """Whether ``model``'s conversion mapping has split or merge rules (modelopt's streaming export
    refuses them; its whole-model reverse regroups them with its own names)."""
    from modelopt.torch.export import unified_export_hf_streaming as streaming

    check = getattr(streaming, "_assert_no_split_rules", None)
    try:
        if check is not None:
            check(model)
    except NotImplementedError:
        return True
    return False


@contextmanager
def names_reversed_later(model: nn.Module) -> Iterator[None]:
    """Where the conversion mapping has split or merge rules, modelopt's streaming export without its
    refusal and with no tensor-name mapper (0.48's maps every piece of a merge to the merged name, so
    they would overwrite each other): every tensor keeps its in-memory name and the post-processing
    reverses them per decoder layer. Elsewhere, a name that comes out of modelopt's mapper with its
    sentinel segment in it keeps its in-memory name (see the module docstring)."""
    from modelopt.torch.export import unified_export_hf_streaming as streaming

    if has_split_rules(model):
        with (
            _replaced(streaming, "_assert_no_split_rules", lambda original: lambda model: None),
            _replaced(streaming, "build_reverse_name_mapper", lambda original: lambda model, **kwargs: None),
        ):
            yield
        return

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def build(model: nn.Module, **kwargs: Any) -> Any:
            mapper = original(model, **kwargs)
            if mapper is None:
                return None
            return lambda name: name if "\x00" in (mapped := mapper(name)) else mapped

        return build

    with _replaced(streaming, "build_reverse_name_mapper", make):
        yield


def quant_config_names_as_resident() -> Any:
    """modelopt 0.48 reverses the exclude list of a streamed export against every module name
    (containers included: ``model.vision_tower``), the resident export against the modules holding a
    weight; a wildcard whose coverage the reverse changes then expands differently. For the export's
    duration the streamed one is reversed as the resident one is."""
    from modelopt.torch.export import quant_aware_conversion as conversion
    from modelopt.torch.export import unified_export_hf as exporter

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def revert(model: nn.Module, hf_quant_config: dict | None) -> dict | None:
            try:
                mapper = conversion.build_reverse_name_mapper(model)
                if mapper is None or not hf_quant_config:
                    return hf_quant_config
                weighted = [n for n, m in model.named_modules() if "weight" in m._parameters or "weight" in m._buffers]
                config = copy.deepcopy(hf_quant_config)
                conversion.revert_quant_config_names(config.get("quantization", {}), mapper, module_names=weighted)
                return config
            except Exception:  # noqa: BLE001 - modelopt's own fallback: keep the names, the post-processing names them
                return original(model, hf_quant_config)

        return revert

    return _replaced(exporter, "_revert_quant_config_names_best_effort", make)


@contextmanager
def streaming_export(model: nn.Module) -> Iterator[None]:
    """Every workaround above that the streaming export of ``model`` needs; nothing when no module
    is offloaded (modelopt then writes the whole state dict at once)."""
    if not any(offload_hook(m) is not None for m in model.modules()):
        yield
        return
    layers = decoder_layer_list(model)
    with ExitStack() as stack:
        if layers is not None:
            stack.enter_context(owner_tensors_resident(model, layers))
            stack.enter_context(materialized_forwards(model, layers))
        stack.enter_context(names_reversed_later(model))
        stack.enter_context(quant_config_names_as_resident())
        yield
