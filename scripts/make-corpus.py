#!/usr/bin/env python3
"""Writes the English text the default model's recovery trains and is evaluated on, from
the documentation strings of Python's standard library (English technical prose that every
Python install carries, so no data set is downloaded).

    python3 scripts/make-corpus.py            # writes data/pydoc-train.txt, data/heldout.txt
    python3 scripts/make-corpus.py --large    # also data/pydoc-train-large.txt
    python3 scripts/make-corpus.py --extra    # also data/pydoc-train-extra.txt
    python3 scripts/make-corpus.py --heldout-more   # also data/heldout-more.txt
    python3 scripts/make-corpus.py --long     # only data/long-prose.txt, data/long-code.txt
    python3 scripts/make-corpus.py --long-train   # only data/long-train.jsonl

The files come from disjoint module lists: held-out text is never trained on. The large
training file covers every importable top-level standard-library module except the held-out
ones (and a few that open windows or print on import), with class methods too. The extra
file covers the submodules of those packages (asyncio.streams, email.message, ...), which
the large file does not: new text for later runs, still disjoint from the held-out modules
(the codec tables under encodings are left out). The second held-out file comes from
third-party packages (requests, click, jinja2, ...), so it cannot overlap any training file,
which are all standard library; it exists because 4,202 held-out tokens resolve a perplexity
ratio only to about 0.01. Each module becomes one document: its docstring, then each public
class and function with its signature and docstring. Doctest
examples (lines starting with >>> and their output) are dropped to keep the text prose.
The committed files were made with Python 3.11.

The two long held-out documents (`eval --seq-len 4096` and longer: several 8,192-token
chunks each, to see what a model remembers past its window) are not docstrings, so they
cannot overlap any training or held-out file; `--long` downloads them with pip, pinned and
checked by sha256, and writes only them (no standard-library file is touched):
- data/long-prose.txt: English prose, "Workshop on Electronic Texts: Proceedings" (Library
  of Congress, 1992, edited by James Daly; a US government work, public domain), from the
  Canterbury corpus file tests/testdata/lcet10.txt in the source distribution of
  Brotli==1.1.0 (PyPI); from the introduction on, hard-wrapped lines joined into
  paragraphs, cut at a paragraph end after LONG_PROSE_CHARS characters (about 40K tokens
  of SmolLM2's tokenizer).
- data/long-code.txt: Python source, bottle.py of bottle==0.12.25 (PyPI source
  distribution; MIT License, whose notice heads the file), whole: tabs expanded, trailing
  spaces dropped, runs of blank lines cut to two.

The long training documents (data/long-train.jsonl, one {"text": ...} per line, for
long-sequence recovery: `recover --seq-len 2048 --segment 512`) come from neither held-out
source: the Canterbury corpus files alice29.txt (Carroll, "Alice's Adventures in
Wonderland"; hard-wrapped lines joined into paragraphs), asyoulik.txt (Shakespeare, "As You
Like It") and plrabn12.txt (Milton, "Paradise Lost", the first PARADISE_CHARS characters),
all public domain, from the same Brotli sdist; and whole standard-library modules
(LONG_TRAIN_MODULES, source code, none of them a held-out module) of the Python running the
script (the committed file: 3.11.7).
"""

import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
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

# Third-party modules (none in any training file) for data/heldout-more.txt; these are the
# versions installed when it was made: requests 2.34, click 8.4, Jinja2 3.1, Werkzeug 3.1,
# python-dateutil 2.9.
HELDOUT_MORE = """
requests.api requests.sessions requests.adapters click.decorators jinja2.loaders
dateutil.rrule dateutil.relativedelta werkzeug.utils
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


# Modules that open windows, print or change state on import, or are packaging tools.
SKIP = """
antigravity this idlelib tkinter turtle turtledemo ensurepip venv lib2to3 pydoc_data test
""".split()


def quiet_import(name):
    """Imports a module without the deprecation warnings some print on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def large_train():
    names = sorted(sys.stdlib_module_names)
    return [n for n in names if not n.startswith("_") and n not in HELDOUT and n not in SKIP]


def extra_train():
    """Public submodules of the large file's packages (the large file has top levels only)."""
    names = []
    for top in large_train():
        if top == "encodings":  # one near-identical codec table per charset
            continue
        try:
            mod = quiet_import(top)
        except Exception:  # platform-specific; safe_document() reports it for the large file
            continue
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), top + "."):
            parts = info.name.split(".")[1:]
            if not any(p.startswith("_") or p.startswith("test") for p in parts):
                names.append(info.name)
    return names


def members(obj, name, methods):
    """Public functions and classes of a module (with their methods if `methods`)."""
    for attr, o in sorted(vars(obj).items()):
        if attr.startswith("_"):
            continue
        if inspect.isclass(o) or inspect.isfunction(o):
            yield f"{name}.{attr}", o
            if methods and inspect.isclass(o) and getattr(o, "__module__", None) == name:
                for m, f in sorted(vars(o).items()):
                    if not m.startswith("_") and inspect.isfunction(f):
                        yield f"{name}.{attr}.{m}", f


def document(name, methods=False):
    mod = quiet_import(name)
    parts = []
    doc = inspect.getdoc(mod)
    if doc:
        parts.append(f"Module {name}\n\n{clean(doc)}")
    for qual, obj in members(mod, name, methods):
        if getattr(obj, "__module__", None) != mod.__name__:
            continue
        doc = inspect.getdoc(obj)
        if not doc or len(doc) < 40:
            continue
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = "(...)"
        # Default values print with memory addresses; drop them so reruns give the same text.
        sig = re.sub(r" at 0x[0-9a-f]+", "", sig)
        if len(sig) > 120:
            sig = "(...)"
        kind = "class" if inspect.isclass(obj) else "function"
        parts.append(f"The {kind} {qual}{sig}\n\n{clean(doc)}")
    return "\n\n".join(p for p in parts if p.strip())


def safe_document(name, methods):
    try:
        return document(name, methods)
    except Exception as e:  # platform-specific or broken modules: skip, say so
        print(f"skipped {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return ""


def write(path, names, methods=False, skip_broken=False):
    """Writes the documents of `names`. `skip_broken` is for the whole-stdlib walks, where a
    platform-specific module may not import; a hand-picked list must import in full, so a
    missing package fails instead of writing a shorter file."""
    docs = [safe_document(n, methods) if skip_broken else document(n, methods) for n in names]
    text = "\n\n\n".join(d for d in docs if d) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{path}: {len(names)} modules, {len(text)} characters", file=sys.stderr)


# Pinned sources of the long documents: (requirement, sdist file, sha256).
BROTLI = ("Brotli==1.1.0", "Brotli-1.1.0.tar.gz",
          "81de08ac11bcb85841e440c13611c00b67d3bf82698314928d0b676362546724")
BOTTLE = ("bottle==0.12.25", "bottle-0.12.25.tar.gz",
          "e1a9c94970ae6d710b3fb4526294dfeb86f2cb4a81eff3a4b98dc40fb0e5e021")
LONG_PROSE_CHARS = 170_000


def sdist_member(source, member, tmp):
    """The text of `member` inside the source distribution `source`, downloaded with pip."""
    req, name, sha = source
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", "--disable-pip-version-check", req, "-d", tmp],
                   check=True)
    path = os.path.join(tmp, name)
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != sha:
        sys.exit(f"{name}: sha256 {got}, expected {sha}")
    with tarfile.open(path) as tar:
        data = tar.extractfile(f"{name[:-len('.tar.gz')]}/{member}").read()
    return data.decode("utf-8").replace("\r\n", "\n")


def long_prose(raw):
    """The proceedings from the introduction on, one paragraph per line, cut at a
    paragraph end past LONG_PROSE_CHARS."""
    body = raw[raw.index("\n                              INTRODUCTION\n"):]
    paras = []
    for block in re.split(r"\n\s*\n", body):
        # One line per paragraph, or per bullet of a list; no rules of + or * characters.
        items = re.split(r"\n(?=\s*\* )", re.sub(r"[+*]{3,}", " ", block))
        text = "\n".join(" ".join(item.split()) for item in items if item.split())
        if not text or set(text) <= set("* \n"):
            continue
        paras.append(text)
        if sum(len(p) + 2 for p in paras) >= LONG_PROSE_CHARS:
            break
    head = ("Workshop on Electronic Texts: Proceedings, 9-10 June 1992, Library of Congress, "
            "edited by James Daly (a US government work in the public domain; the Canterbury "
            "corpus file lcet10.txt as shipped in Brotli 1.1.0).")
    return head + "\n\n" + "\n\n".join(paras) + "\n"


def long_code(source, license_text):
    """bottle.py under its MIT notice, whitespace normalized (indentation kept)."""
    lines = [line.expandtabs(4).rstrip() for line in source.split("\n")]
    text = re.sub(r"\n{4,}", "\n\n\n", "\n".join(lines)).strip("\n")
    notice = "\n".join(("# " + line).rstrip() for line in license_text.strip().split("\n"))
    head = "# bottle.py from bottle 0.12.25 (PyPI), under its MIT License:\n#\n" + notice
    return head + "\n\n" + text + "\n"


PARADISE_CHARS = 200_000
LONG_TRAIN_MODULES = """
argparse calendar configparser csv dataclasses difflib enum functools pathlib shutil
statistics threading
""".split()


def tidy(text):
    """Tabs expanded, trailing spaces dropped, runs of blank lines cut to one."""
    lines = [line.expandtabs(4).rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def joined_paragraphs(text):
    """Hard-wrapped lines joined; blank lines separate paragraphs."""
    paras = re.split(r"\n\s*\n", text)
    joined = [" ".join(l.strip() for l in p.splitlines() if l.strip()) for p in paras]
    return "\n\n".join(p for p in joined if p) + "\n"


def write_long_train(root):
    assert not set(LONG_TRAIN_MODULES) & set(HELDOUT)
    with tempfile.TemporaryDirectory() as tmp:
        alice, play, poem = (sdist_member(BROTLI, f"tests/testdata/{f}", tmp)
                             for f in ("alice29.txt", "asyoulik.txt", "plrabn12.txt"))
    poem = tidy(poem)
    docs = [joined_paragraphs(tidy(alice)), tidy(play),
            poem[:poem.rfind("\n\n", 0, PARADISE_CHARS)].strip() + "\n"]
    stdlib = sysconfig.get_paths()["stdlib"]
    for m in LONG_TRAIN_MODULES:
        with open(os.path.join(stdlib, m + ".py"), encoding="utf-8") as f:
            docs.append(tidy(f.read()))
    path = os.path.join(root, "long-train.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    print(f"{path}: {len(docs)} documents, {sum(map(len, docs))} characters", file=sys.stderr)


def write_long(root):
    with tempfile.TemporaryDirectory() as tmp:
        prose = long_prose(sdist_member(BROTLI, "tests/testdata/lcet10.txt", tmp))
        code = long_code(sdist_member(BOTTLE, "bottle.py", tmp),
                         sdist_member(BOTTLE, "LICENSE", tmp))
    for name, text in (("long-prose.txt", prose), ("long-code.txt", code)):
        path = os.path.join(root, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"{path}: {len(text)} characters", file=sys.stderr)


if __name__ == "__main__":
    assert not set(TRAIN) & set(HELDOUT)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
    os.makedirs(root, exist_ok=True)
    if "--long" in sys.argv[1:]:
        write_long(root)
        sys.exit(0)
    if "--long-train" in sys.argv[1:]:
        write_long_train(root)
        sys.exit(0)
    write(os.path.join(root, "pydoc-train.txt"), TRAIN)
    write(os.path.join(root, "heldout.txt"), HELDOUT)
    if "--large" in sys.argv[1:]:
        path = os.path.join(root, "pydoc-train-large.txt")
        write(path, large_train(), methods=True, skip_broken=True)
    if "--extra" in sys.argv[1:]:
        path = os.path.join(root, "pydoc-train-extra.txt")
        write(path, extra_train(), methods=True, skip_broken=True)
    if "--heldout-more" in sys.argv[1:]:
        write(os.path.join(root, "heldout-more.txt"), HELDOUT_MORE, methods=True)
