"""Loading a local model folder: its transformers class, its weights (placed by accelerate, or all
offloaded to disk for the layer-by-layer path), its tokenizer. Never the network."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..base.errors import MoeUnfuseError, first_line
from ..base.memory import available_memory


def model_class(path: Path | str) -> type:
    """The transformers class ``path/config.json`` names in ``architectures``."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MoeUnfuseError(
            f"{path}: no config.json; fix: pass a local model folder (hub names are not downloaded; use `hf download` first)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - invalid JSON, a list, an unknown model_type: all one line
        raise MoeUnfuseError(
            f"{path}/config.json: cannot be read by transformers ({first_line(exc, 160)}); fix: restore the model's config.json"
        ) from None
    archs = getattr(config, "architectures", None) or []
    cls = transformers_class(archs, getattr(config, "model_type", None))
    if cls is None:
        raise MoeUnfuseError(
            f'{path}/config.json: architectures {archs or "(none)"} not in transformers {transformers.__version__}; fix: set "architectures" to the model class'
        )
    return cls


def transformers_class(archs: Sequence[str], model_type: str | None = None) -> type | None:
    """The transformers class a config's ``architectures`` names: the name itself, or else the class
    transformers registers for the same ``model_type`` under a spelling that differs only in case
    (the hub's Phi-3.5-MoE says ``PhiMoEForCausalLM``, transformers v5 names it ``PhimoeForCausalLM``,
    and ``AutoModelForCausalLM`` loads it by ``model_type``). None when neither exists."""
    import transformers

    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is not None or not model_type:
        return cls
    from transformers.models.auto import modeling_auto

    registered = {
        name.lower(): name
        for attr, mapping in vars(modeling_auto).items()
        if attr.endswith("_MAPPING_NAMES") and isinstance(name := mapping.get(model_type), str)
    }
    for a in archs:
        name = registered.get(a.lower())
        if name is not None and hasattr(transformers, name):
            return getattr(transformers, name)
    return None


def load_model(path: Path | str, device_map: str | None = "auto", dtype: str = "auto") -> nn.Module:
    """A transformers model from a local folder (never the network), placed by accelerate's ``device_map``.
    Under ``auto`` accelerate is given the host memory this process may use (cgroup limits included,
    which accelerate's own default ignores) and every GPU's free memory; what does not fit there it
    offloads to disk (:func:`offloaded_to_disk` says which modules)."""
    placement: dict[str, Any] = {"device_map": device_map} if device_map and device_map != "none" else {}
    if device_map == "auto":
        placement["max_memory"] = auto_max_memory()
    return _from_pretrained(path, dtype, placement, f"with device_map={device_map!r}", "or pass --device-map cpu")


def auto_max_memory() -> dict[int | str, int]:
    """accelerate's ``max_memory`` for ``device_map="auto"``: each GPU's free memory and 90% of the
    host memory left to this process (transformers keeps the same 10% margin on the host)."""
    gpus = (
        {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        if torch.cuda.is_available()
        else {}
    )
    return {**gpus, "cpu": int(available_memory() * 0.9)}


def offloaded_to_disk(model: nn.Module) -> list[str]:
    """Modules accelerate placed on disk when it loaded ``model`` (its ``hf_device_map``)."""
    return sorted(
        name or "(model)" for name, where in (getattr(model, "hf_device_map", None) or {}).items() if where == "disk"
    )


def load_offloaded(
    path: Path | str, offload_dir: Path | str, dtype: str = "auto", device: torch.device | str = "cpu"
) -> nn.Module:
    """A transformers model from a local folder with every module offloaded to disk: accelerate reads
    a module's weights from the checkpoint's safetensors files only for its forward, straight onto
    ``device``, where the forward runs. ``offload_dir`` receives only the tensors a load-time
    conversion rewrote (e.g. per-expert hub tensors fused)."""
    from ..core.offload import set_execution_device

    placement = {"device_map": {"": "disk"}, "offload_folder": str(offload_dir)}
    model = _from_pretrained(path, dtype, placement, "offloaded to disk", "or pass --no-layerwise")
    _keep_in_fp32_as_loaded(model)
    set_execution_device(model, device)
    return model


def _from_pretrained(path: Path | str, dtype: str, placement: dict[str, Any], how: str, fix: str) -> nn.Module:
    path = Path(path)
    cls = model_class(path)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
    try:
        model = cls.from_pretrained(path, **kwargs, **placement)
    except (OSError, ValueError, RuntimeError) as exc:
        raise MoeUnfuseError(
            f"{path}: cannot load {how} ({first_line(exc)}); fix: check the folder's weights, {fix}"
        ) from None
    return model.eval()


def _keep_in_fp32_as_loaded(model: nn.Module) -> None:
    """Give offloaded parameters the dtype a resident load gives them. transformers upcasts the
    modules a model keeps in fp32 (``_keep_in_fp32_modules_strict``: routers, attention sinks) while
    loading resident weights only; accelerate casts an offloaded weight to its meta parameter's dtype
    whenever it loads it, so setting that dtype makes every forward and the export see fp32 too."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(model.dtype)
    if not plan:
        return
    pattern, group_glob, _ = build_glob_alternation(list(plan))
    for name, param in list(model.named_parameters()):
        match = pattern.search(name)
        if not param.is_meta or match is None:
            continue
        dtype = plan[group_glob[match.lastgroup]]
        if param.dtype != dtype and param.is_floating_point():
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            module._parameters[leaf] = nn.Parameter(
                torch.empty(param.shape, dtype=dtype, device="meta"), requires_grad=param.requires_grad
            )


def checkpoint_bytes(path: Path | str) -> int:
    """Bytes of a folder's ``*.safetensors`` (0 when it has none)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_tokenizer(path: Path | str) -> Any:
    import transformers

    fix = "fix: save the model's tokenizer in that folder (tokenizer.json or tokenizer.model and tokenizer_config.json)"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing or broken tokenizer
        raise MoeUnfuseError(f"{path}: no usable tokenizer ({first_line(exc, 160)}); {fix}") from None
    if not tokenizer("calibration text", add_special_tokens=False)["input_ids"]:
        raise MoeUnfuseError(
            f"{path}: the tokenizer found there turns text into no tokens (no tokenizer files?); {fix}"
        )
    return tokenizer
