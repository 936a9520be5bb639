"""A seeded mutator over the built-in spec files, for the spec-loader fuzz test.

Each mutant is the text of one spec file with random edits (keys deleted or added, values of
another type, huge or deeply nested values, hostile strings, YAML features a spec must not use,
corrupt bytes). :func:`outcome` loads one and classifies what happened: ``accepted`` (a Spec),
``clean`` (a one-line SpecError) or ``traceback`` (anything else). No hypothesis: the generator
is ``random.Random(seed)`` so a failure is replayed from its seed and index alone.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"

HOSTILE_STRINGS = (
    "",
    " ",
    "os.system",
    "subprocess.Popen",
    "builtins.eval",
    "transformers.pipeline",
    "__import__('os')",
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    "x//0",
    "2*",
    "*",
    "num_experts//0",
    "1e999",
    "-1",
    "nan",
    "a" * 5000,
    "+".join(["hidden"] * 50000),
    "(" * 500 + "1" + ")" * 500,
    "\u202e\u0000",
    "ünïcödé",
    "(?<!unclosed",
    "[",
    "${HOME}",
    "%s%n",
    "\\",
    "torch.nn.Linear",
    "transformers.PretrainedConfig",
    "transformers.models.gemma4.modeling_gemma4.Gemma4TextExperts",
    "transformers.Gemma4TextConfig",
    "hidden_states",
    "top_k_index",
    "forward",
    "_apply_gate",
    "register_buffer",
    "interleaved",
)


def _hostile_values(rng: random.Random) -> Any:
    choices: list[Callable[[], Any]] = [
        lambda: rng.choice(HOSTILE_STRINGS),
        lambda: rng.choice([0, -1, 1, 2, 3, 10**30, -(10**30), 2**63]),
        lambda: rng.choice([0.5, -0.0, float("inf"), float("nan"), 1e308]),
        lambda: rng.choice([True, False, None]),
        lambda: [],
        lambda: {},
        lambda: [rng.choice(HOSTILE_STRINGS[:12]) for _ in range(rng.randint(1, 5))],
        lambda: list(range(rng.choice([3, 1000, 20000]))),
        lambda: {rng.choice(HOSTILE_STRINGS[:6]) or "k": rng.randint(0, 9)},
        lambda: _nested(rng.choice([5, 30, 200])),
    ]
    return rng.choice(choices)()


def _nested(depth: int) -> Any:
    value: Any = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path into ``node`` (containers and leaves)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.extend(_paths(v, (*prefix, i)))
    return out


def _parent(root: Any, path: tuple) -> Any:
    node = root
    for part in path[:-1]:
        node = node[part]
    return node


def _edit_tree(rng: random.Random, raw: dict) -> dict:
    raw = copy.deepcopy(raw)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(raw)
        if not paths:
            raw["arch"] = _hostile_values(rng)
            continue
        path = rng.choice(paths)
        parent = _parent(raw, path)
        op = rng.random()
        if op < 0.3:  # delete
            del parent[path[-1]]
        elif op < 0.75:  # replace with another type or a hostile value
            parent[path[-1]] = _hostile_values(rng)
        elif op < 0.9 and isinstance(parent, dict):  # an unknown or repeated-looking key
            parent[rng.choice(["colour", "extends", "abstract", "top_k", "kind", "method", "param"])] = _hostile_values(
                rng
            )
        elif isinstance(parent[path[-1]], str):  # a small corruption of a real string
            s = parent[path[-1]]
            i = rng.randrange(len(s) + 1)
            parent[path[-1]] = s[:i] + rng.choice(["_", ".", "..", "/", "(", "*2", "//0", " ", "\t"]) + s[i:]
        else:
            parent[path[-1]] = _hostile_values(rng)
    return raw


def _dump(raw: Any) -> str:
    try:
        return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=10**9)
    except (yaml.YAMLError, RecursionError, ValueError):
        return "arch: [unclosed\n"


def _text_edit(rng: random.Random, text: str) -> str | bytes:
    lines = text.splitlines(keepends=True)
    op = rng.randrange(12)
    if op == 0:  # a deep flow list
        depth = rng.choice([50, 1000, 100_000])
        return text + f"colour: {'[' * depth}{']' * depth}\n"
    if op == 1:  # a deep block mapping
        depth = rng.choice([30, 300, 3000])
        return text + "".join(f"{' ' * i}k{i}:\n" for i in range(depth)) + " " * depth + "v\n"
    if op == 2:  # an alias bomb
        bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        bomb += [f"a{i}: &a{i} [{', '.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 12)]
        return text + "colour:\n" + "".join(f"  {b}\n" for b in bomb)
    if op == 3:  # an anchor and alias on real values
        return text.replace("dims:", "dims: &d", 1) + "extra_dims: *d\n"
    if op == 4 and lines:  # a duplicate key
        line = rng.choice([ln for ln in lines if ln[:1].isalpha()] or lines)
        return text + line
    if op == 5:  # non-UTF-8 bytes
        data = bytearray(text.encode())
        data[rng.randrange(len(data) + 1) : 0] = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\x80", b"\xed\xa0\x80"])
        return bytes(data)
    if op == 6:  # mixed-type and non-string keys
        return text + rng.choice(
            ["dims: {1: a, b: c}\n", "colour: {1: a, b: c, null: d, 2.5: e}\n", "? [a, b]\n: c\n", "true: 1\n"]
        )
    if op == 7:  # truncated
        return text[: rng.randrange(len(text) + 1)]
    if op == 8:  # random byte flips
        data = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if op == 9:  # a huge file
        return text + "description: " + "x" * rng.choice([10_000, 2_000_000]) + "\n"
    if op == 10:  # tags a safe loader must refuse, or python-specific ones
        return text + rng.choice(
            [
                "colour: !!python/object/apply:os.system [echo hi]\n",
                "colour: !!binary aGk=\n",
                "colour: !custom x\n",
                "colour: !!set {a, b}\n",
            ]
        )
    return text.replace(
        "extends: _standard",
        rng.choice(
            [
                "extends: ../specs/_standard",
                "extends: /etc/passwd",
                "extends: _standard/../_standard",
                "extends: 5",
                "extends: [a]",
                "extends: nowhere",
            ]
        ),
        1,
    )


@dataclass
class Mutant:
    name: str
    data: str | bytes


def mutants(seed: int, count: int) -> list[Mutant]:
    """``count`` mutants of the built-in specs, the same for the same seed."""
    rng = random.Random(seed)
    files = sorted(SPECS_DIR.glob("*.yaml"))
    texts = {f.name: f.read_text() for f in files}
    raws = {name: yaml.safe_load(t) for name, t in texts.items()}
    out = []
    for i in range(count):
        name = rng.choice(sorted(texts))
        if rng.random() < 0.55:
            data: str | bytes = _dump(_edit_tree(rng, raws[name]))
        else:
            data = _text_edit(rng, texts[name])
        out.append(Mutant(f"{i}-{name}", data))
    return out


def outcome(path: Path, check_import: bool = True) -> tuple[str, str]:
    """``(kind, detail)``: accepted, clean (one-line SpecError) or traceback (any other result)."""
    from moe_unfuse import SpecError, load_spec

    try:
        load_spec(path, (SPECS_DIR,), check_import=check_import)
    except SpecError as exc:
        msg = str(exc)
        if "\n" in msg or len(msg) > 2000 or not msg.startswith(str(path)) or "; fix: " not in msg:
            return "traceback", f"SpecError not one line: {msg[:300]!r}"
        return "clean", msg
    except BaseException as exc:  # noqa: BLE001 - the point: classify whatever escaped
        return "traceback", f"{type(exc).__name__}: {str(exc)[:300]}"
    return "accepted", ""


def extends_chain(directory: Path, length: int) -> Path:
    """A spec at the end of an ``extends`` chain ``length`` files long (a RecursionError before)."""
    (directory / "c0.yaml").write_text((SPECS_DIR / "_standard.yaml").read_text())
    for i in range(1, length + 1):
        (directory / f"c{i}.yaml").write_text(f"extends: c{i - 1}\n")
    last = directory / f"c{length}.yaml"
    last.write_text(
        "arch: chain\nextends: c{}\ntarget: {{class: transformers.models.mixtral.modeling_mixtral.MixtralExperts}}\n".format(
            length - 1
        )
    )
    return last
