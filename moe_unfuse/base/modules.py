"""Finding a module's source on disk the way the import system would, without importing anything.

Deciding whether a spec's class exists must not import ~70 modeling files, nor even the packages on
the way (``import transformers`` alone costs a second): spec validation and ``moe-unfuse list`` run
it for every spec.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def module_source(module: str) -> Path | bool | None:
    """The source file of ``module``, found on disk the way the import system would, without
    importing any package on the way (``transformers.models`` alone costs a third of a second).

    False: the module certainly does not exist (no such top-level package, or no such submodule in
    its package's directories); None: undecidable without importing (an extension module, a
    namespace package, a package whose module has no ``__path__``).
    """
    parts = module.split(".")
    loaded = sys.modules.get(parts[0])
    if loaded is not None:
        locations = list(getattr(loaded, "__path__", None) or [])
    else:
        try:
            top = importlib.util.find_spec(parts[0])  # a top-level name: located, not imported
        except (ImportError, ValueError):
            return None
        if top is None:
            return False
        locations = list(top.submodule_search_locations or [])
    if len(parts) == 1 or not locations:
        return None
    for i, part in enumerate(parts[1:], start=1):
        last = i == len(parts) - 1
        package = next((Path(d) / part for d in locations if (Path(d) / part / "__init__.py").is_file()), None)
        if package is None:
            module_file = next((Path(d) / f"{part}.py" for d in locations if (Path(d) / f"{part}.py").is_file()), None)
            if last and module_file is not None:
                return module_file
            other = any(
                (Path(d) / part).is_dir()
                or any((Path(d) / f"{part}{s}").exists() for s in importlib.machinery.EXTENSION_SUFFIXES)
                for d in locations
            )
            return None if other else False
        if last:
            return package / "__init__.py"
        loaded = sys.modules.get(".".join(parts[: i + 1]))
        locations = list(getattr(loaded, "__path__", None) or []) if loaded is not None else [str(package)]
        if not locations:
            return None
    return None
