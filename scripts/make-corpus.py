#!/usr/bin/env python3
"""Writes the English text the default model's recovery trains and is evaluated on, from
the documentation strings of Python's standard library (English technical prose that every
Python install carries, so no data set is downloaded).

    python3 scripts/make-corpus.py            # writes data/pydoc-train.txt, data/heldout.txt

The two files come from disjoint module lists: held-out text is never trained on. Each
module becomes one document: its docstring, then each public class and function with its
signature and docstring. Doctest examples (lines starting with >>> and their output) are
dropped to keep the text prose. The committed files were made with Python 3.11.
"""

import importlib
import inspect
import os
import re
import sys
import warnings

TRAIN = """
abc argparse base64 bisect calendar codecs collections configparser contextlib copy csv
dataclasses datetime decimal difflib enum fnmatch functools getopt gettext glob gzip
hashlib logging numbers operator pathlib pickle pprint queue random sched shlex shutil
statistics string tempfile threading timeit types uuid weakref zipfile
""".split()

HELDOUT = """
json textwrap fractions heapq secrets graphlib
""".split()


def clean(doc):
    """Drops doctest blocks and reST role markup; keeps paragraphs."""
    out, skipping = [], False
    for line in doc.splitlines():
        s = line.strip()
        if s.startswith(">>>") or s.startswith("..."):
            skipping = True
            continue
        if skipping:
            if s == "":
                skipping = False
            continue
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r":(?:mod|func|class|meth|attr|exc|data|const|term|ref|pep):`~?([^`]+)`", r"\1", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def document(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = importlib.import_module(name)
    parts = []
    doc = inspect.getdoc(mod)
    if doc:
        parts.append(f"Module {name}\n\n{clean(doc)}")
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_"):
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < 40:
            continue
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = "(...)"
        if len(sig) > 120:
            sig = "(...)"
        kind = "class" if inspect.isclass(obj) else "function"
        parts.append(f"The {kind} {name}.{attr}{sig}\n\n{clean(doc)}")
    return "\n\n".join(p for p in parts if p.strip())


def write(path, names):
    docs = [document(n) for n in names]
    text = "\n\n\n".join(d for d in docs if d) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{path}: {len(names)} modules, {len(text)} characters", file=sys.stderr)


if __name__ == "__main__":
    assert not set(TRAIN) & set(HELDOUT)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
    os.makedirs(root, exist_ok=True)
    write(os.path.join(root, "pydoc-train.txt"), TRAIN)
    write(os.path.join(root, "heldout.txt"), HELDOUT)
