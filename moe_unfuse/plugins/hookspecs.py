"""Every hook a moe_unfuse plugin can implement.

Each hook receives a ``register`` callable and calls it once per thing it contributes, as in
simonw/llm. Built-in features use the same hooks (see ``moe_unfuse.default_plugins``); third-party
packages add theirs through the ``moe_unfuse`` entry-point group. Registering a name twice is an
error naming both contributors, so one plugin cannot silently shadow another. What an implementation
may import from moe_unfuse is :mod:`moe_unfuse.plugin`, and the built-in plugins import nothing else.
"""

from __future__ import annotations

from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("moe_unfuse")
hookimpl = pluggy.HookimplMarker("moe_unfuse")


@hookspec
def register_specs(register: Callable) -> None:
    """Contribute spec files: ``register(path)`` with a ``.yaml`` file or a directory of them."""


@hookspec
def register_activations(register: Callable) -> None:
    """Contribute named activations: ``register(name, factory)``, ``factory(**params)`` returns ``tensor -> tensor``."""


@hookspec
def register_gates(register: Callable) -> None:
    """Contribute gating kinds: ``register(kind, gate)`` with a :class:`moe_unfuse.plugin.GateKind`.

    Contract: ``gate.build(module, cfg, act, split)`` runs once per experts module at unfuse time
    (``cfg`` is the spec's ``gate`` mapping, ``act`` the resolved activation, ``split`` the
    :class:`~moe_unfuse.base.layout.Split` that unpacks gate and up) and returns ``packed -> hidden``,
    element-wise and exact to the original's gating; it raises AttributeError/KeyError/TypeError/
    ValueError for what the module lacks (reported as a one-line SpecError). The declared ``params``
    and ``required`` are checked when a spec loads."""


@hookspec
def register_forwards(register: Callable) -> None:
    """Contribute forward kinds: ``register(kind, forward)`` with a :class:`moe_unfuse.plugin.ForwardKind`.

    Contract: ``forward(module, *args, **kwargs)`` replaces the fused forward of an unfused experts
    module and must equal the original's (golden-tested); it reads the module through the public
    API only: ``moe_unfuse.plugin.unfuse_state(module)`` (spec, expert count, ``bind`` for the
    arguments' roles, ``extra["forward"]`` from ``prepare``), ``resolve_dims`` for the spec's sizes,
    and ``module[e]`` for expert ``e``.
    The declared ``roles`` and ``options`` are checked when a spec loads."""


@hookspec
def register_backends(register: Callable) -> None:
    """Contribute quantizer backends: ``register(name, backend)``.

    Contract: ``backend.register(spec)`` makes the quantizer convert ``spec``'s class into
    per-expert quantized linears (unfusing through ``moe_unfuse.unfuse`` or
    ``moe_unfuse.plugin.build_plan`` / ``apply_plan``), is idempotent for the same spec, replaces an
    earlier registration of an edited spec, and raises :class:`~moe_unfuse.plugin.SpecError` when the
    class is not installed. The ``modelopt`` backend also has ``prepare_export()``, which the export
    calls before modelopt's ``export_hf_checkpoint`` writes unfused experts."""


@hookspec
def register_commands(register: Callable) -> None:
    """Contribute ``moe-unfuse`` subcommands: ``register(name, command)``, where ``command`` (or the
    dotted name of a module, imported when the command line is parsed) has a docstring (its help),
    ``add_arguments(parser)``, ``run(args) -> int`` (the exit code) and optionally ``ALIASES`` (other
    names for it), like the built-in ones in ``moe_unfuse.cli.commands`` (registered by the default
    plugin ``commands``). A name or alias a built-in command has is an error. ``run`` keeps heavy
    imports inside it: every command line builds the parser from every command."""


@hookspec
def register_engines(register: Callable) -> None:
    """Contribute serving engines: ``register(name, engine)`` with a :class:`moe_unfuse.plugin.Engine`
    whose ``name`` is ``name`` (``quantize --engine NAME``, ``verify --engine NAME``, a spec's
    ``export.renames[].engine``). The built-in ones are ``vllm``, ``sglang``, ``trtllm`` and ``hf``.

    Contract: each of ``engine.rules`` is a :class:`~moe_unfuse.plugin.EngineRule` (``name``, the
    engine ``versions`` and the loader ``source`` file:line it was read from, ``what`` it requires in one
    line, ``check``). ``verify --engine NAME`` calls ``rule.check(ctx)`` once per checkpoint, after the
    export contract, with a :class:`~moe_unfuse.plugin.EngineContext`: the rule's only view of the
    checkpoint (tensor names, shapes and dtypes, tensors on demand, the quantization configs, the
    experts modules and their specs; it never writes). ``check`` returns the offending items (tensor
    names, config fields or modules, each with why), an empty list when the checkpoint is fine; a
    non-empty list fails the check named ``rule.name``, citing ``versions`` and ``source``."""
