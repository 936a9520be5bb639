"""Draft a spec YAML for a fused experts class (or every experts class of a module).

Reads the use_experts_implementation flags of an instance built on the meta device from the
class's config (shrunk to tiny, distinct sizes), the parameter shapes and the undecorated forward.
What it cannot decide is printed as YAML comments and on stderr. Exit status 0 when the draft is
complete, 1 when something is left to decide. Then prove the draft: moe-unfuse check FILE.

  moe-unfuse draft transformers.models.mixtral.modeling_mixtral.MixtralExperts
  moe-unfuse draft transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe --out specs/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Old names of this command, kept for one release.
ALIASES = ("infer",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="CLASS_OR_MODULE",
        help="import path of an experts class, or of a modeling module (all its experts classes)",
    )
    parser.add_argument("--arch", help="arch name for the draft (default: from the modeling module's name)")
    parser.add_argument(
        "--config",
        metavar="CLASS",
        help="import path of the config class to build the module from (default: found in its module)",
    )
    parser.add_argument(
        "--config-kwargs",
        metavar="JSON",
        help="config keyword arguments as JSON (default: tiny sizes for the fields the config has)",
    )
    parser.add_argument(
        "--module-kwargs", metavar="JSON", help="extra constructor keyword arguments of the experts class, as JSON"
    )
    parser.add_argument("--out", type=Path, metavar="DIR", help="write DIR/<arch>.yaml instead of printing")


def _json_arg(value: str | None, flag: str) -> dict | None:
    from ...base.errors import MoeUnfuseError

    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise MoeUnfuseError(
            f"{flag}: not valid JSON ({exc.msg} at column {exc.colno}); fix: quote it, e.g. {flag} '{{\"hidden_size\": 64}}'"
        ) from None
    if not isinstance(parsed, dict):
        raise MoeUnfuseError(f"{flag}: must be a JSON object; fix: e.g. {flag} '{{\"hidden_size\": 64}}'")
    return parsed


def run(args: argparse.Namespace) -> int:
    from ...base.errors import MoeUnfuseError
    from ...tools.draft import draft_all
    from ...tools.golden import import_object

    config_cls = None
    if args.config:
        try:
            config_cls = import_object(args.config, "config", "--config", "--config")
        except (ImportError, AttributeError, ValueError):
            raise MoeUnfuseError(
                f"--config: cannot import {args.config!r}; fix: give the config class's import path, e.g. transformers.MixtralConfig"
            ) from None
    drafts = list(
        draft_all(
            args.target,
            config_cls=config_cls,
            config_kwargs=_json_arg(args.config_kwargs, "--config-kwargs"),
            module_kwargs=_json_arg(args.module_kwargs, "--module-kwargs"),
            arch=args.arch,
        )
    )
    texts = []
    for draft in drafts:
        for note in draft.notes:
            print(f"moe-unfuse draft: {draft.cls.__name__}: could not decide: {note}", file=sys.stderr)
        text = draft.to_yaml()
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{draft.spec['arch']}.yaml"
            path.write_text(text)
            print(f"wrote {path}", file=sys.stderr)
        else:
            texts.append(text)
    if texts:
        print("---\n".join(texts), end="")
    return 0 if all(d.complete for d in drafts) else 1
