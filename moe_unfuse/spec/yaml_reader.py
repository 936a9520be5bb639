"""Reading a spec file's YAML safely: size and depth limits, no anchors, tags or duplicate keys.

Spec files are untrusted, so this reader builds plain values from the parser's events itself and
caches each parsed content; nothing else in the package touches YAML.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import yaml

from ..base.errors import SpecError
from .limits import MAX_DEPTH, MAX_SPEC_BYTES, clip

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_SCALAR_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null")}
_COLLECTION_TAGS = {"tag:yaml.org,2002:seq", "tag:yaml.org,2002:map"}
_NO_KEY = object()
#: parsed mappings by content hash: a file rewritten in the same mtime tick is parsed again
_PARSED: dict[bytes, Any] = {}


def _compose(text: str, source: str) -> Any:
    """The YAML document in ``text`` as plain dicts, lists and scalars.

    Built from the parser's events (an iterative state machine, also in libyaml) rather than by
    the composer, which recurses once per nesting level (a deep document crashes the C one), so
    each rule is checked as the event arrives: depth, anchors and aliases (an alias bomb expands
    without bound), duplicate and non-string keys, tags other than plain scalars and collections.
    """
    loader = _YAML_LOADER(text)

    def fail(event: Any, problem: str, fix: str) -> SpecError:
        mark = getattr(event, "start_mark", None)
        return SpecError(source, f"line {mark.line + 1}" if mark is not None else "(file)", problem, fix)

    stack: list[list[Any]] = []  # [container, pending key or _NO_KEY, key -> line]
    root: Any = _NO_KEY
    documents = 0
    try:
        while True:
            event = loader.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                break
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise fail(event, "holds more than one YAML document", "keep one spec per file (remove the ---)")
                continue
            if isinstance(event, (yaml.StreamStartEvent, yaml.DocumentEndEvent)):
                continue
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise fail(
                    event,
                    "uses a YAML anchor or alias",
                    "write the value out in full (use extends to share a base spec)",
                )
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                value = stack.pop()[0]
            elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if event.tag not in (None, "!", *_COLLECTION_TAGS):
                    raise fail(
                        event,
                        f"tag {clip(event.tag, 40)!r} is not allowed",
                        "remove the tag: a spec holds plain mappings, lists and scalars",
                    )
                if len(stack) >= MAX_DEPTH:
                    raise fail(
                        event,
                        f"nests deeper than {MAX_DEPTH} levels",
                        "flatten the value (a spec is a few levels deep)",
                    )
                stack.append([{} if isinstance(event, yaml.MappingStartEvent) else [], _NO_KEY, {}])
                continue
            else:  # ScalarEvent
                value = _scalar(loader, event, fail)
            if not stack:
                root = value
                continue
            top = stack[-1]
            if isinstance(top[0], list):
                top[0].append(value)
            elif top[1] is _NO_KEY:
                if not isinstance(value, str):
                    raise fail(
                        event,
                        f"key {clip(repr(value), 40)} is a {type(value).__name__}, not a string",
                        "write every key as a plain name",
                    )
                if value in top[2]:
                    raise fail(
                        event,
                        f"duplicate key {clip(value, 40)!r} (first on line {top[2][value]})",
                        "keep one of the two",
                    )
                top[2][value] = event.start_mark.line + 1
                top[1] = value
            else:
                top[0][top[1]] = value
                top[1] = _NO_KEY
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        if "nesting depth" in str(exc):  # libyaml 0.2.5+ stops deep documents itself, before our check
            raise SpecError(
                source,
                where,
                f"nests deeper than {MAX_DEPTH} levels",
                "flatten the value (a spec is a few levels deep)",
            ) from None
        raise SpecError(
            source, where, f"not valid YAML ({clip(str(getattr(exc, 'problem', None) or exc))})", "fix the YAML syntax"
        ) from None
    finally:
        loader.dispose()
    return None if root is _NO_KEY else root


def _scalar(loader: Any, event: Any, fail: Any) -> Any:
    """A scalar event's value, resolved as the safe loader would (YAML 1.1 ints, floats, bools, null)."""
    tag = event.tag
    if tag in (None, "!"):
        tag = loader.resolve(yaml.ScalarNode, event.value, event.implicit)
    elif tag not in _SCALAR_TAGS:
        raise fail(
            event,
            f"tag {clip(tag, 40)!r} is not allowed",
            "remove the tag: a spec holds plain mappings, lists and scalars",
        )
    if tag not in _SCALAR_TAGS:  # e.g. an unquoted date: kept as the text it is
        return event.value
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark, event.style)
    try:
        return loader.yaml_constructors[tag](loader, node)
    except (ValueError, yaml.YAMLError) as exc:  # e.g. an integer with more digits than Python converts
        raise fail(
            event,
            f"cannot read {clip(event.value, 40)!r} ({clip(str(exc), 60)})",
            "write a smaller number or quote the value",
        ) from None


def read_yaml(path: Path) -> dict:
    """The file's mapping; parsed once per file content (base specs are read by every spec extending them)."""
    source = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(
                source,
                "(file)",
                f"is {size} bytes, over the {MAX_SPEC_BYTES}-byte limit for a spec",
                "a spec is a few KB: remove what does not belong in it",
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(
            source, "(file)", f"cannot be read ({exc.strerror or exc.__class__.__name__})", "check the path"
        ) from None
    if len(data) > MAX_SPEC_BYTES:  # grew since stat
        raise SpecError(
            source,
            "(file)",
            f"is over the {MAX_SPEC_BYTES}-byte limit for a spec",
            "a spec is a few KB: remove what does not belong in it",
        )
    key = hashlib.blake2b(data, digest_size=16).digest()
    parsed = _PARSED.get(key, _NO_KEY)
    if parsed is _NO_KEY:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise SpecError(
                source, f"line {line}", f"byte {exc.start} is not UTF-8 ({exc.reason})", "save the file as UTF-8"
            ) from None
        parsed = _compose(text.removeprefix("\ufeff"), source)
        if len(_PARSED) >= 512:
            _PARSED.clear()
        _PARSED[key] = parsed
    if not isinstance(parsed, dict):
        raise SpecError(source, "(root)", "is not a mapping", "write the spec as YAML key: value pairs")
    return copy.deepcopy(parsed)
