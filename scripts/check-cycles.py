#!/usr/bin/env python3
"""Checks that no crate's modules import each other in a cycle.

Every `crate::...` and `super::...` path in a crate's non-test code is an edge from the
module using it to the module it names. Edges are compared among siblings: a path from
`engine/worker/step.rs` to `engine::local` is an edge `worker -> local` inside `engine`,
and one from `api/chat.rs` to `crate::engine` is `api -> engine` at the crate root. A
module naming its own ancestor or descendant adds no edge (a parent declares its
children). Any strongly connected component of two or more siblings is reported.

Usage: scripts/check-cycles.py [CRATE_SRC_DIR ...]   (default: model/src server/src converter/src)
"""
import re
import sys
from pathlib import Path

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)")


def module_of(src: Path, file: Path) -> tuple:
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def code_of(text: str) -> str:
    # Non-test code: up to the first `#[cfg(test)]`, comments stripped.
    text = text.split("#[cfg(test)]")[0]
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def uses(code: str):
    """Yields (anchor, [segments]) for every path, braces expanded one level."""
    for m in re.finditer(r"\b(crate|super(?:::super)*)::([^;]*?)(?=[;\s)(,<>!=&|]|$)", code):
        anchor, rest = m.group(1), m.group(2)
        yield anchor, rest
    for m in re.finditer(r"\buse\s+(crate|super(?:::super)*)::\{([^;]*)\};", code, flags=re.S):
        for item in m.group(2).split(","):
            yield m.group(1), item.strip()


def main() -> int:
    srcs = [Path(a) for a in sys.argv[1:]] or [Path(p) for p in ("model/src", "server/src", "converter/src")]
    bad = 0
    for src in srcs:
        files = [f for f in src.rglob("*.rs") if f.name != "tests.rs"]
        modules = {module_of(src, f): f for f in files}
        edges = {}
        for mod, f in modules.items():
            here = mod if f.stem in ("mod", "lib", "main") else mod
            parent = mod[:-1]
            for anchor, rest in uses(code_of(f.read_text())):
                base = () if anchor == "crate" else parent[: len(parent) - (anchor.count("super") - 1)]
                if anchor != "crate" and f.stem in ("mod",):
                    # `super` in a mod.rs is the directory's parent.
                    base = mod[: len(mod) - anchor.count("super")]
                segs = [s for s in re.split(r"::", rest.strip("{} ")) if s]
                target = list(base)
                for s in segs:
                    s = re.match(r"[A-Za-z_][A-Za-z0-9_]*", s)
                    if not s or tuple(target + [s.group(0)]) not in modules:
                        break
                    target.append(s.group(0))
                target = tuple(target)
                # The sibling pair under the common parent.
                k = 0
                while k < min(len(here), len(target)) and here[k] == target[k]:
                    k += 1
                if k == len(here) or k == len(target):
                    continue  # ancestor or descendant
                a, b = here[: k + 1], target[: k + 1]
                edges.setdefault(a, set()).add(b)
        # Tarjan's strongly connected components.
        index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

        def visit(v):
            index[v] = low[v] = counter[0]
            counter[0] += 1
            stack.append(v)
            on.add(v)
            for w in edges.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)

        sys.setrecursionlimit(10000)
        for v in list(edges):
            if v not in index:
                visit(v)
        for comp in out:
            bad += 1
            names = sorted("::".join(c) for c in comp)
            print(f"{src}: import cycle among {', '.join(names)}")
            for c in sorted(comp):
                for w in sorted(edges.get(c, ())):
                    if w in comp:
                        print(f"    {'::'.join(c)} -> {'::'.join(w)}")
    if bad == 0:
        print("no import cycles in " + ", ".join(str(s) for s in srcs))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
