"""Draft a spec from a fused experts class, so a new architecture starts from facts, not typing.

What transformers states about a class is read, not guessed: the ``use_experts_implementation``
flags (set on each instance in ``__init__``: is_concatenated, is_transposed, has_bias, has_gate,
has_post_expert_norm), the parameter shapes of an instance built on the meta device from its
config class shrunk to distinct tiny sizes (H 64, I 40, E 4, so every axis names one dim), and the
undecorated forward (signature and source: accumulation dtype, ``@`` versus ``F.linear``, fp32
upcasts). What cannot be decided that way is listed in :attr:`Draft.notes`; the caller prints it.

Why one module of ~680 lines: it is one procedure, :func:`draft`, reading one class's facts in order;
its helpers (config discovery, the meta instance, shapes, forward facts, roles) each serve one step
of it and nothing else, so split files would only scatter that reading.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import yaml

from ..base.errors import MoeUnfuseError, first_line

ROLES = ("hidden_states", "top_k_index", "top_k_weights")
FLAGS = ("is_concatenated", "is_transposed", "has_bias", "has_gate", "has_post_expert_norm")

#: Config fields set to tiny, pairwise distinct sizes when they exist on the config class. The
#: values are chosen so that no size equals another or twice another: each axis names one dim.
TINY_CONFIG = {
    "hidden_size": 64,
    "moe_hidden_size": 64,
    "intermediate_size": 40,
    "moe_intermediate_size": 40,
    "expert_ffn_hidden_size": 40,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
#: Module attribute name fragments that identify each dim, best first.
DIM_HINTS = {
    "num_experts": ("num_experts", "num_local_experts", "n_routed_experts", "expert"),
    "hidden": ("hidden_dim", "hidden_size", "hidden", "input_dim", "model_dim"),
    "intermediate": ("intermediate_dim", "intermediate_size", "intermediate", "expert_dim", "ffn"),
}


@dataclass
class Draft:
    """A drafted spec mapping and what could not be decided about it."""

    cls: type
    spec: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.notes

    def to_yaml(self) -> str:
        """The spec as YAML, headed by comments: where it came from and every undecided point."""
        head = [f"# Drafted by `moe-unfuse draft` from {self.cls.__module__}.{self.cls.__qualname__}."]
        if self.notes:
            head.append("# Could not decide (fix these, then run `moe-unfuse check FILE`):")
            head += [f"#   - {n}" for n in self.notes]
        else:
            head.append("# Run `moe-unfuse check FILE`; when it passes, add target.verified_on.")
        body = yaml.safe_dump(self.spec, sort_keys=False, default_flow_style=None, width=110)
        return "\n".join(head) + "\n" + body


def _undecorated(fn: Callable) -> Callable:
    """The function under ``functools.wraps`` decorators (use_experts_implementation uses it)."""
    return inspect.unwrap(fn)


def is_decorated(cls: type) -> bool:
    """True for classes that ``use_experts_implementation`` wrapped (their forward dispatches)."""
    fwd = cls.__dict__.get("forward")
    code = getattr(fwd, "__code__", None)
    return bool(hasattr(fwd, "__wrapped__") and code is not None and "experts_interface" in code.co_freevars)


def import_target(path: str) -> list[type]:
    """The class at ``path``, or every fused-experts-looking class a module at ``path`` defines."""
    from torch import nn

    try:
        module = importlib.import_module(path)
    except ImportError:
        module = None
    if module is not None:
        found = [
            obj
            for name, obj in vars(module).items()
            if inspect.isclass(obj)
            and issubclass(obj, nn.Module)
            and obj.__module__ == module.__name__
            and (is_decorated(obj) or name.endswith("Experts"))
        ]
        if not found:
            raise MoeUnfuseError(
                f"{path}: no experts class (decorated by use_experts_implementation or named *Experts); fix: name the class, e.g. {path}.SomeExperts"
            )
        return found
    mod_name, _, cls_name = path.rpartition(".")
    if not mod_name:
        raise MoeUnfuseError(
            f"{path}: not an import path; fix: give module.Class, e.g. transformers.models.mixtral.modeling_mixtral.MixtralExperts"
        )
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise MoeUnfuseError(
            f"{path}: cannot import module {mod_name!r} ({exc.__class__.__name__}: {exc}); fix: check the path and the installed transformers"
        ) from None
    cls = getattr(mod, cls_name, None)
    if not inspect.isclass(cls):
        raise MoeUnfuseError(
            f"{path}: {mod_name} has no class {cls_name!r}; fix: check the class name (moe-unfuse draft {mod_name} lists its experts classes)"
        )
    return [cls]


def _config_base() -> type:
    import transformers

    return getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig


def config_candidates(cls: type) -> list[type]:
    """Config classes the experts class may take: its ``config`` annotation first, then every config
    class the modeling module knows (text configs before the composite configs that hold them)."""
    base = _config_base()
    init = _undecorated(cls.__init__)
    module = inspect.getmodule(cls)
    namespace = vars(module) if module else {}
    out: list[type] = []
    try:
        params = list(inspect.signature(init).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    if params and params[0].annotation is not inspect.Parameter.empty:
        ann = params[0].annotation
        if isinstance(ann, str):
            ann = namespace.get(ann.strip("'\""))
        if inspect.isclass(ann) and issubclass(ann, base):
            out.append(ann)
    configs = [obj for obj in namespace.values() if inspect.isclass(obj) and issubclass(obj, base) and obj is not base]
    for c in configs:
        for sub in getattr(c, "sub_configs", {}).values():
            if inspect.isclass(sub) and issubclass(sub, base) and sub not in configs:
                configs.append(sub)
    words = set(_camel_words(cls.__name__))
    configs.sort(key=lambda c: (-_name_fit(words, c.__name__), bool(getattr(c, "sub_configs", None)), c.__name__))
    out += [c for c in configs if c not in out]
    return out


def _camel_words(name: str) -> list[str]:
    return re.findall(r"[A-Z][a-z0-9]*|[0-9]+", name)


def _name_fit(words: set[str], config_name: str) -> int:
    """Words the config's name shares with the class's, less the words it adds: Qwen3OmniMoeThinkerTextExperts
    fits Qwen3OmniMoeTextConfig (4 shared) better than Qwen3OmniMoeTalkerTextConfig (4 shared, Talker added: 3)."""
    theirs = [w for w in _camel_words(config_name) if w != "Config"]
    return sum(w in words for w in theirs) - sum(w not in words for w in theirs)


def _tiny_kwargs(config_cls: type) -> dict[str, Any]:
    """The TINY_CONFIG fields this config class has (lists of sizes keep their length)."""
    try:
        default = config_cls()
    except Exception:  # noqa: BLE001 - any config that cannot build with defaults gets no shrinking
        return {}
    out: dict[str, Any] = {}
    aliases = getattr(config_cls, "attribute_map", {}) or {}
    for key, value in TINY_CONFIG.items():
        if key not in vars(default) and key not in aliases:
            continue
        try:
            current = getattr(default, key, None)
        except Exception:  # noqa: BLE001 - e.g. per-layer fields that refuse a global read (Dots3Note)
            continue
        if isinstance(current, bool):
            continue
        if current is None or isinstance(current, int):  # None: an optional size (e.g. MoE off by default)
            out[key] = value
        elif isinstance(current, list) and current and all(isinstance(v, int) for v in current):
            out[key] = [value] * len(current)
    return out


def _make_config(config_cls: type, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A config with as many tiny fields as it accepts (fields its validation rejects are dropped)."""
    try:
        return config_cls(**kwargs), kwargs
    except Exception:  # noqa: BLE001 - strict config validation: drop the field that it rejects
        for key in kwargs:
            rest = {k: v for k, v in kwargs.items() if k != key}
            try:
                return config_cls(**rest), rest
            except Exception:  # noqa: BLE001
                continue
    return config_cls(), {}


def build_instance(
    cls: type,
    config_cls: type | None = None,
    config_kwargs: dict[str, Any] | None = None,
    module_kwargs: dict[str, Any] | None = None,
) -> tuple[Any, type, dict[str, Any]]:
    """Build ``cls`` on the meta device (no memory) from a tiny config; returns (module, config class, kwargs used)."""
    import torch

    errors: list[str] = []
    for candidate in [config_cls] if config_cls else config_candidates(cls):
        kwargs = dict(config_kwargs) if config_kwargs is not None else _tiny_kwargs(candidate)
        try:
            config, kwargs = _make_config(candidate, kwargs) if config_kwargs is None else (candidate(**kwargs), kwargs)
            with torch.device("meta"):
                module = cls(config, **(module_kwargs or {}))
        except Exception as exc:  # noqa: BLE001 - a wrong candidate fails in arbitrary ways; try the next
            errors.append(f"{candidate.__name__}: {first_line(exc, with_type=True)}")
            continue
        if any(p.dim() >= 2 for p in module.parameters()):
            return module, candidate, kwargs
        errors.append(f"{candidate.__name__}: built, but owns no fused parameter")
    if config_cls is None and config_kwargs is None:
        sizes, problem = size_kwargs(cls)
        if problem is None:
            try:
                with torch.device("meta"):
                    module = cls(**{**sizes, **(module_kwargs or {})})
            except Exception as exc:  # noqa: BLE001 - reported with the config attempts below
                problem = f"{first_line(exc, with_type=True)}"
            else:
                if any(p.dim() >= 2 for p in module.parameters()):
                    return module, None, {**sizes, **(module_kwargs or {})}
                problem = "built, but owns no fused parameter"
        errors.append(f"keyword arguments: {problem}")
    tried = "; ".join(errors[:3]) or "no config class found in its module"
    raise MoeUnfuseError(
        f"{cls.__name__}: cannot build an instance from a config or from keyword arguments ({tried}); fix: pass --config CLASS and --config-kwargs JSON, or --module-kwargs JSON"
    )


#: Constructor parameter name fragments -> the tiny size given to a class built from plain
#: integers (``__init__(self, num_experts, hidden_size, intermediate_size)``), best match first.
SIZE_HINTS = (
    (("num_experts", "n_experts", "num_local_experts", "n_routed_experts", "experts"), TINY_CONFIG["num_experts"]),
    (("top_k", "topk", "experts_per_tok"), TINY_CONFIG["num_experts_per_tok"]),
    (("intermediate", "ffn", "expert_dim", "inter_dim", "moe_dim"), TINY_CONFIG["intermediate_size"]),
    (("hidden", "d_model", "model_dim", "embed_dim"), TINY_CONFIG["hidden_size"]),
)


def size_kwargs(cls: type) -> tuple[dict[str, int], str | None]:
    """Tiny sizes for each constructor parameter without a default, by name (see :data:`SIZE_HINTS`);
    a problem naming the first parameter no hint covers, else None."""
    try:
        params = list(inspect.signature(_undecorated(cls.__init__)).parameters.values())[1:]
    except (TypeError, ValueError):
        return {}, "no inspectable constructor"
    sizes: dict[str, int] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        size = next((value for hints, value in SIZE_HINTS if any(h in p.name.lower() for h in hints)), None)
        if size is None:
            return {}, f"no size for constructor parameter {p.name!r}"
        sizes[p.name] = size
    return sizes, (None if sizes else "the constructor takes no size")


def _import_path(obj: type) -> str:
    import transformers

    if getattr(transformers, obj.__name__, None) is obj:
        return f"transformers.{obj.__name__}"
    return f"{obj.__module__}.{obj.__qualname__}"


def _int_attrs(module: Any) -> dict[str, int]:
    return {
        k: v
        for k, v in vars(module).items()
        if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")
    }


def _pick_attr(attrs: dict[str, int], size: int, dim: str) -> str | None:
    """The module attribute holding ``size`` whose name best fits ``dim`` (None when none holds it)."""
    names = [k for k, v in attrs.items() if v == size]
    for hint in DIM_HINTS[dim]:
        for name in names:
            if hint in name:
                return name
    return names[0] if len(names) == 1 else None


@dataclass
class _ForwardFacts:
    """What the undecorated forward's source says, beyond its signature."""

    accumulate: str | None = None  # float32 | top_k_weights | None (the input's dtype)
    bias_add: bool = False  # `x @ W + b`: a bias added after a matmul, not F.linear's fused addmm
    upcast: bool = False  # upcasts weights with .float()
    calls: set[str] = field(default_factory=set)  # self.<method>(...) calls


def _forward_facts(fn: Callable, params: list[str]) -> _ForwardFacts:
    facts = _ForwardFacts()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return facts
    weights_name = params[2] if len(params) >= 3 else None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
                facts.calls.add(func.attr)
            if isinstance(func, ast.Attribute) and func.attr == "zeros_like":
                for kw in node.keywords:
                    if kw.arg != "dtype":
                        continue
                    src = ast.unparse(kw.value)
                    if src in ("torch.float32", "torch.float"):
                        facts.accumulate = "float32"
                    elif weights_name and src == f"{weights_name}.dtype":
                        facts.accumulate = "top_k_weights"
            if isinstance(func, ast.Attribute) and func.attr == "float" and isinstance(func.value, ast.Subscript):
                facts.upcast = True
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            if any(
                isinstance(side, ast.BinOp) and isinstance(side.op, ast.MatMult) for side in (node.left, node.right)
            ):
                facts.bias_add = True
    return facts


def _forward_args(params: list[str], notes: list[str]) -> dict[str, str] | None:
    if set(params) >= set(ROLES):
        return {p: p for p in params if p in ROLES}
    if len(params) == 3:
        if not _obvious_roles(params):
            notes.append(
                f"forward({', '.join(params)}): roles mapped by position to {', '.join(ROLES)}; check the order"
            )
        return dict(zip(params, ROLES))
    notes.append(
        f"forward({', '.join(params)}) is not a routed (hidden_states, top_k_index, top_k_weights) forward: choose a forward kind (moe-unfuse list) and map its args"
    )
    return None


def _obvious_roles(params: list[str]) -> bool:
    """Names that say their role (GPT-OSS: router_indices, routing_weights)."""
    return "hidden" in params[0] and ("indices" in params[1] or "index" in params[1]) and "weight" in params[2]


def draft(
    cls: type,
    config_cls: type | None = None,
    config_kwargs: dict[str, Any] | None = None,
    module_kwargs: dict[str, Any] | None = None,
    arch: str | None = None,
) -> Draft:
    """Draft a spec for ``cls``; :attr:`Draft.notes` lists what it could not decide."""
    import transformers
    from torch import nn

    notes: list[str] = []
    module, cfg_cls, used_kwargs = build_instance(cls, config_cls, config_kwargs, module_kwargs)
    decorated = is_decorated(cls)
    flags = {f: getattr(module, f) for f in FLAGS if hasattr(module, f)} if decorated else {}
    if not decorated:
        notes.append(
            "undecorated class (no use_experts_implementation flags): orientation and packing are read from the parameter shapes; check the forward"
        )

    num_experts = _expert_count(module, used_kwargs)
    # fused parameters are found by structure: 3-D with the expert count leading (any name)
    fused = {
        n: p
        for n, p in module.named_parameters(recurse=False)
        if p.dim() == 3 and (num_experts is None or p.shape[0] == num_experts)
    }
    roles = _structural_roles(fused, flags)
    # with names that say nothing, any [E, n] parameter may be a bias; else only *_bias ones
    biases = {
        n: p
        for n, p in module.named_parameters(recurse=False)
        if p.dim() == 2 and (n.endswith("_bias") or (roles and p.shape[0] == num_experts and n not in fused))
    }
    others = [n for n, p in module.named_parameters() if n not in fused and n not in biases and p.dim() >= 2]
    if others:
        notes.append(
            f"parameters {', '.join(others)} are not 3-D [expert, ., .] tensors of the module itself: describe them by hand (flattened experts, submodules)"
        )
    attrs = _int_attrs(module)

    gate_up = fused.get("gate_up_proj")
    down = fused.get("down_proj")
    transposed = flags.get("is_transposed")
    if gate_up is None and down is None and roles:  # names unknown: roles read from the shapes
        gate_up = next((fused[n] for n, r in roles.items() if r[0] == "gate_up"), None)
        down = next((fused[n] for n, r in roles.items() if r[0] == "down"), None)
        transposed = roles[next(iter(roles))][1] if transposed is None else transposed
    if transposed is None and down is not None:
        ref = gate_up if gate_up is not None else fused.get("up_proj")
        if ref is not None:
            a, b = ref.shape[1:]
            c, d = down.shape[1:]
            transposed = not (b == c) and (a == d)
    axes = ["expert", "in", "out"] if transposed else ["expert", "out", "in"]

    num_experts_attr = None
    dims: dict[str, Any] = {}
    params: dict[str, Any] = {}
    shapes: dict[str, tuple[Any, list[str], dict[str, Any]]] = {}
    has_gate = flags.get("has_gate", gate_up is not None)
    for name, p in fused.items():
        out_size, in_size = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])
        if name == "gate_up_proj" and has_gate:
            into = ["gate_proj", "up_proj"]
        elif name in ("gate_proj", "up_proj", "down_proj"):
            into = [name]
        elif name == "gate_up_proj":
            into = ["up_proj"]
        elif name in roles:
            into = {"gate_up": ["gate_proj", "up_proj"], "up": ["up_proj"], "down": ["down_proj"]}[roles[name][0]]
            if roles[name][2]:
                notes.append(roles[name][2])
        else:
            notes.append(f"parameter {name} {list(p.shape)}: unknown role, give its into: by hand")
            continue
        num_experts_attr = num_experts_attr or _pick_attr(attrs, p.shape[0], "num_experts")
        entry: dict[str, Any] = {"axes": list(axes)}
        shapes[name] = (p, into, entry)
    # Shapes after every role is known, twice: a size read from one parameter (no attribute holds
    # it) also names the matching axis of a parameter listed before it.
    for final in (False, True):
        for name, (p, into, entry) in shapes.items():
            if "shape" in entry:
                continue
            shape = _shape(name, p, into, transposed, attrs, dims, fused)
            if None not in shape and num_experts_attr:
                entry["shape"] = ["num_experts", *shape]
            elif final:
                notes.append(f"{name} {list(p.shape)}: no module attribute holds every size, so its shape is left out")
    for name, (p, into, entry) in shapes.items():
        out_size = p.shape[2] if transposed else p.shape[1]
        entry["into"] = into
        if len(into) == 2:
            concatenated = flags.get("is_concatenated", True)
            entry["packing"] = "concatenated" if concatenated else "interleaved"
            if not decorated:
                notes.append(
                    f"{name}: packing assumed concatenated (gate rows, then up rows); check the forward's split"
                )
        bias_name = (
            f"{name}_bias"
            if f"{name}_bias" in biases
            else _structural_bias(name, p, out_size, biases, fused, transposed)
        )
        if bias_name in biases:
            entry["bias"] = bias_name
        params[name] = entry
    if not params:
        raise MoeUnfuseError(
            f"{cls.__name__}: owns no 3-D fused expert parameter (found {', '.join(n for n, _ in module.named_parameters()) or 'none'}); fix: write this spec by hand (see CONTRIBUTING.md)"
        )
    if num_experts_attr is None:
        notes.append("no module attribute holds the expert count: set dims.num_experts")
    unused_biases = sorted(set(biases) - {e.get("bias") for e in params.values()})
    if unused_biases:
        notes.append(f"bias parameters {', '.join(unused_biases)} match no fused weight: attach them by hand")

    spec: dict[str, Any] = {
        "spec_version": 1,
        "arch": arch or _arch_name(cls),
        "description": f"{cls.__name__}: drafted by moe-unfuse draft on transformers {transformers.__version__}.",
        "target": {"class": f"{cls.__module__}.{cls.__qualname__}"},
        "dims": {
            "num_experts": num_experts_attr or "TODO",
            **{d: dims[d] for d in ("hidden", "intermediate") if d in dims},
        },
        "params": params,
    }

    forward = _undecorated(cls.forward)
    sig_params = [p for p in list(inspect.signature(forward).parameters)[1:]]
    facts = _forward_facts(forward, sig_params)
    if any("gate_proj" in e["into"] for e in params.values()):
        if _own_apply_gate(cls):  # the class's own gate, called on the packed [gate, up]: exact by construction
            spec["gate"] = {"kind": "module_method", "method": "_apply_gate"}
            if "_apply_gate" not in facts.calls:
                notes.append(
                    "the class defines _apply_gate but its eager forward does not call it: check that gate.kind module_method computes what the forward does"
                )
        else:
            spec["activation"] = _activation(module, notes)
            spec["gate"] = {"kind": "glu"}
    else:
        spec["activation"] = _activation(module, notes)
        spec["gate"] = {"kind": "none"}
    if flags.get("has_post_expert_norm"):
        if isinstance(getattr(module, "post_expert_norm", None), nn.Module):
            spec["post_expert_norm"] = {"attribute": "post_expert_norm"}
        else:
            notes.append("has_post_expert_norm=True but no post_expert_norm submodule: name the norm's attribute")
    linear: dict[str, Any] = {}
    if biases and facts.bias_add:
        linear["bias"] = "after_matmul"
    if facts.upcast:
        linear["compute_dtype"] = "float32"
    if linear:
        spec["linear"] = linear
    args = _forward_args(sig_params, notes)
    if args is not None:
        spec["forward"] = {"kind": "routed", "args": args}
        if facts.accumulate:
            spec["forward"]["accumulate"] = facts.accumulate

    if cfg_cls is None:  # built from plain integer keyword arguments: no config involved
        golden: dict[str, Any] = {
            "config": _import_path(_config_base()),
            "config_kwargs": {},
            "config_arg": False,
            "module_kwargs": used_kwargs,
        }
    else:
        golden = {"config": _import_path(cfg_cls), "config_kwargs": used_kwargs}
        if module_kwargs:
            golden["module_kwargs"] = module_kwargs
    golden["top_k"] = 2
    if decorated:
        golden["implementations"] = ["grouped_mm", "batched_mm"]
    spec["golden"] = golden
    return Draft(cls, spec, notes)


def _shape(
    name: str,
    p: Any,
    into: list[str],
    transposed: bool | None,
    attrs: dict[str, int],
    dims: dict[str, Any],
    fused: dict[str, Any],
) -> list[Any]:
    """``p``'s shape after the expert axis, in storage order, as dims expressions (None where no
    dim fits); records each dim's source in ``dims``: an attribute holding the size, else the
    parameter axis it was read from."""
    out_size, in_size = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])
    out_axis, in_axis = (2, 1) if transposed else (1, 2)
    role_dims = ("hidden", "intermediate") if into == ["down_proj"] else ("intermediate", "hidden")
    shape: list[Any] = []
    for size, dim, factor, axis in ((out_size, role_dims[0], len(into), out_axis), (in_size, role_dims[1], 1, in_axis)):
        attr = _pick_attr(attrs, size // factor, dim) if size % factor == 0 else None
        if attr is None and isinstance(dims.get(dim), dict):
            ref = dims[dim]
            attr = ref if fused[ref["param"]].shape[ref["axis"]] * factor == size else None
        elif attr is None and factor == 1 and dim not in dims:  # no attribute holds it: read the parameter's size
            attr = {"param": name, "axis": axis}
        if attr is None or dims.setdefault(dim, attr) != attr:
            shape.append(None)
            continue
        shape.append(f"{factor}*{dim}" if factor > 1 else dim)
    return shape[::-1] if transposed else shape


def _expert_count(module: Any, used_kwargs: dict[str, Any]) -> int | None:
    """The expert count of an instance built here: the tiny size given, else the most common
    leading size of its 3-D parameters."""
    tiny = TINY_CONFIG["num_experts"]
    leading = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    if tiny in leading:
        return tiny
    return max(set(leading), key=leading.count) if leading else None


def _structural_roles(fused: dict[str, Any], flags: dict[str, Any]) -> dict[str, tuple]:
    """``name -> (role, transposed, note)`` for fused parameters whose names say nothing, read from
    the tiny sizes (H 64, I 40): ``{H, 2I}`` holds gate and up, ``{H, I}`` is up or down, and the
    orientation is where the 2I axis sits. ``note``: set when a name had to decide (non-gated)."""
    hidden, inter = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"]
    known = {"gate_up_proj", "gate_proj", "up_proj", "down_proj"}
    if known & set(fused):
        return {}
    roles: dict[str, tuple] = {}
    transposed = flags.get("is_transposed")
    for name, p in fused.items():
        if sorted(p.shape[1:]) == sorted((hidden, 2 * inter)):
            t = p.shape[2] == 2 * inter
            transposed = t if transposed is None else transposed
            roles[name] = ("gate_up", t, None)
    pairs = [n for n, p in fused.items() if sorted(p.shape[1:]) == sorted((hidden, inter))]
    guessed = None
    if transposed is None and len(pairs) == 2 and not roles:
        # non-gated: up is H -> I, down is I -> H; without a gate_up to orient by, a name decides
        down = next((n for n in pairs if "down" in n or n.endswith("2")), None)
        if down is not None:
            transposed = fused[down].shape[2] == hidden
            guessed = f"{down} taken as down_proj by its name (its shape {list(fused[down].shape)} fits either role): check the orientation"
    for name in pairs:
        if transposed is None:
            continue
        out = fused[name].shape[2] if transposed else fused[name].shape[1]
        roles[name] = ("down" if out == hidden else "up", transposed, None)
    if guessed:
        first = next(iter(roles))
        roles[first] = (*roles[first][:2], guessed)
    return roles


def _structural_bias(
    name: str, p: Any, out_size: int, biases: dict[str, Any], fused: dict[str, Any], transposed: bool | None
) -> str | None:
    """The ``[E, out]`` parameter that is ``name``'s bias: the only one of its out size, or, when
    several fit, the one whose name shares the most leading characters with ``name``."""
    fits = [b for b, t in biases.items() if t.dim() == 2 and t.shape == (p.shape[0], out_size) and b not in fused]
    if not fits:
        return None
    return max(fits, key=lambda b: (len(_common_prefix(b, name)), _common_suffix(b, name)))


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def _common_suffix(a: str, b: str) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


def _own_apply_gate(cls: type) -> bool:
    """True when the class (or a base) defines ``_apply_gate`` other than transformers' default."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - older transformers
        _default_apply_gate = None
    fn = getattr(cls, "_apply_gate", None)
    return fn is not None and fn is not _default_apply_gate


def _activation(module: Any, notes: list[str]) -> dict[str, Any]:
    if callable(getattr(module, "act_fn", None)):
        return {"attribute": "act_fn"}
    notes.append(
        "no act_fn attribute: set activation to {name: ...} (a transformers ACT2FN name) or the attribute that holds it"
    )
    return {"name": "TODO"}


def _arch_name(cls: type) -> str:
    """``modeling_mixtral`` -> ``mixtral``; the class name in snake case otherwise."""
    mod = cls.__module__.rsplit(".", 1)[-1]
    if mod.startswith("modeling_"):
        return mod[len("modeling_") :]
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__.removesuffix("Experts")).lower()


def draft_all(path: str, **kwargs: Any) -> Iterable[Draft]:
    """A draft for each class ``path`` names (a class, or a module's experts classes)."""
    for cls in import_target(path):
        yield draft(cls, **kwargs)
