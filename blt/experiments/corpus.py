"""The demo's corpus, with no download: English prose that every Python installation carries, and Shakespeare.

Sources, all read as files from the standard library directory (`sysconfig.get_paths()["stdlib"]`),
parsed with `ast`/`tokenize`, never imported or executed:

- the help topics of `pydoc_data/topics.py` (what `help("if")` prints): the `topics` dict literal is
  evaluated with `ast.literal_eval`. Some distributions strip `pydoc_data`; the corpus then holds the
  docstrings and comments alone.
- the docstrings (module, class, function) and comments of the standard library's own `.py` files,
  outside `site-packages` and the test suites, demos and vendored code listed in `SKIP_DIRS`.

Cleaning keeps paragraphs that read as prose: doctest sessions, code-like and table-like lines,
licence and copyright headers, markup-only lines and short fragments are dropped. Paragraphs are
deduplicated exactly and near-exactly (after folding case, digits, punctuation and spacing), then
packed, module by module, into documents of about `DOC_BYTES`. The result is deterministic for a
given Python build: files are read in sorted order and nothing depends on hashing seeds or time.

The text is the Python documentation and source commentary, under the PSF License (the stdlib's
`LICENSE.txt`).

`shakespeare_corpus` adds plays: the tiny Shakespeare file of char-rnn and nanoGPT (1.1 MB, 40,000 lines of
dialogue from Shakespeare's plays, public domain), shipped inside the package xz-compressed (364 KB). The
standard library alone is technical prose: a model trained on it alone loses to xz on ordinary English.

`books_corpus` adds four public-domain books. Three are the English texts of the Canterbury Corpus (the
compression benchmark of Arnold and Bell, 1997), shipped as the corpus's files xz-compressed (333 KB for
1.06 MB): Lewis Carroll's *Alice's Adventures in Wonderland* (`alice29.txt`), the proceedings of the Library of
Congress's 1992 Workshop on Electronic Texts (`lcet10.txt`, a work of the US government) and John Milton's
*Paradise Lost* (`plrabn12.txt`), each a Project Gutenberg etext of the early 1990s, whose Project Gutenberg
front and back matter is cut off when they are read. The fourth is the Jargon File 4.4.7 (29 Dec 2003), the
hackers' lexicon, in Debian's `dict-jargon` format (1.4 MB, shipped xz-compressed in 437 KB), which its
authors placed in the public domain.
"""

from __future__ import annotations

import ast
import lzma
import os
import re
import sysconfig
from importlib import resources
from pathlib import Path

from blt.errors import BltError

DOC_BYTES = 3000
PLAY_DOC_BYTES = 16_000  # the plays in long documents: a scene's speakers and names recur across them
MIN_PARAGRAPH = 60  # characters; shorter paragraphs are fragments ("Return x.", "XXX")
SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "__pycache__",
    "__phello__",
    "encodings",
    "config",
    "lib-dynload",
}
SKIP_FILES = {"this.py", "antigravity.py", "__hello__.py", "_sysconfigdata", "pydoc_data"}

_LICENCE = re.compile(
    r"copyright|licen[cs]e|all rights reserved|warranty|permission is hereby granted|redistribut|author:", re.I
)
_CODEISH = re.compile(
    r"^\s*(>>>|\.\.\.|\$ |%|def |class |import |from \S+ import|return |if .*:$|for .*:$|@\w)"
    r"|[{};]\s*$|\w\(.*\)\s*$|==|!=|->|::|^\s*[-=~^*+#]{3,}\s*$"
)
_WORD = re.compile(r"[A-Za-z][a-z]+(?:'[a-z]+)?")
_NEAR = re.compile(r"[^a-z]+")


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise BltError(f"the standard library directory {path} does not exist")
    return path


# ---- sources ---------------------------------------------------------------------------------------
def help_topics(stdlib: Path) -> dict[str, str]:
    """pydoc's help topics, read from pydoc_data/topics.py as a literal; {} when the file is absent."""
    path = stdlib / "pydoc_data" / "topics.py"
    if not path.is_file():
        return {}
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return {}
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets) and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return (
                {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
                if isinstance(value, dict)
                else {}
            )
    return {}


def source_files(stdlib: Path) -> list[Path]:
    """The standard library's .py files outside site-packages, tests, demos and vendored code."""
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", "test")))
        for name in sorted(names):
            if (
                name.endswith(".py")
                and not name.startswith("test_")
                and not any(name.startswith(s) for s in SKIP_FILES)
            ):
                files.append(Path(root) / name)
    rel = str(stdlib) + os.sep
    return sorted(files, key=lambda p: str(p).replace(rel, ""))


_LEX = re.compile(
    r"""(?P<p>[rRuUbBfF]{0,2})(?P<q>\"\"\"|''')(?P<body>(?:\\.|[^\\])*?)(?P=q)"""
    r"""|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*'|(?P<c>\#[^\n]*)""",
    re.S,
)


def cleandoc(text: str) -> str:
    """A docstring's text as `inspect.cleandoc` gives it: the first line stripped, the rest dedented."""
    lines = text.expandtabs().splitlines()
    indents = [len(line) - len(line.lstrip()) for line in lines[1:] if line.strip()]
    margin = min(indents, default=0)
    return "\n".join([lines[0].strip() if lines else ""] + [line[margin:].rstrip() for line in lines[1:]]).strip()


def docstrings_and_comments(source: str) -> list[str]:
    """The triple-quoted strings that stand as statements (docstrings) and the blocks of whole-line
    comments of a module, in source order. A regular-expression lexer skips the other string
    literals so that a `#` inside a string is no comment; it is ten times faster than `ast.parse`."""
    texts: list[str] = []
    block: list[str] = []
    last_line = -2
    for m in _LEX.finditer(source):
        line_start = source.rfind("\n", 0, m.start()) + 1
        if source[line_start : m.start()].strip():  # not at the start of a line: part of an expression
            continue
        if m.group("q"):
            if not set(m.group("p").lower()) & {"b", "f"}:
                texts.append(cleandoc(m.group("body")))
            continue
        if m.group("c") is None:
            continue
        text = m.group("c").lstrip("#").strip()
        if block and source.count("\n", last_line, line_start) != 1:
            texts.append("\n".join(block))
            block = []
        last_line = line_start
        if not text or text.startswith(("!", "-*-", "type:", "noqa", "pragma", "fmt:", "pylint")):
            if block:
                texts.append("\n".join(block))
                block = []
            continue
        block.append(text)
    if block:
        texts.append("\n".join(block))
    return texts


# ---- cleaning --------------------------------------------------------------------------------------
def is_prose_line(line: str) -> bool:
    s = line.strip()
    if not s or _CODEISH.search(s):
        return False
    letters = sum(c.isalpha() for c in s)
    return letters >= 0.6 * len(s) and len(_WORD.findall(s)) >= 2


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` that read as English prose, each with its lines re-joined by spaces."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines or any(line.lstrip().startswith(">>>") for line in lines):
            continue
        # an indented paragraph (inside a cleaned docstring) is a code sample or a table
        if all(line.startswith((" ", "\t")) for line in lines if line.strip()):
            continue
        kept = [line.strip() for line in lines if is_prose_line(line)]
        if len(kept) < 0.7 * len([line for line in lines if line.strip()]):
            continue
        joined = " ".join(kept)
        words = _WORD.findall(joined)
        if len(joined) < MIN_PARAGRAPH or len(words) < 8 or _LICENCE.search(joined):
            continue
        if sum(len(w) for w in words) < 0.65 * len(joined):  # identifiers, numbers, markup
            continue
        out.append(joined)
    return out


def near_key(text: str) -> str:
    return _NEAR.sub("", text.lower())


def pack(name: str, paragraphs: list[str], doc_bytes: int = DOC_BYTES, sep: str = "\n\n") -> list[tuple[str, str]]:
    """Consecutive paragraphs joined by `sep` (a blank line) into documents of about `doc_bytes`."""
    docs, section, size = [], [], 0
    for para in paragraphs:
        section.append(para)
        size += len(para) + len(sep)
        if size >= doc_bytes:
            docs.append((f"{name}-{len(docs)}", sep.join(section).strip("\n")))
            section, size = [], 0
    if section:
        docs.append((f"{name}-{len(docs)}", sep.join(section).strip("\n")))
    return docs


# ---- the corpus ------------------------------------------------------------------------------------
def stdlib_corpus(
    max_bytes: int | None = None,
    topics: bool = True,
    docstrings: bool = True,
    stdlib: str | Path | None = None,
    doc_bytes: int = DOC_BYTES,
) -> list[tuple[str, str]]:
    """(name, text) documents: pydoc's help topics cut at blank lines into ~`doc_bytes` sections, then the
    cleaned, deduplicated docstrings and comments of the standard library, module by module, until
    `max_bytes` of text (None: all of it). Help topics come first so a cap trims docstrings only."""
    root = Path(stdlib) if stdlib else stdlib_dir()
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    total = 0

    def fresh(paragraphs: list[str]) -> list[str]:
        kept = []
        for para in paragraphs:
            key = near_key(para)
            if key and key not in seen:
                seen.add(key)
                kept.append(para)
        return kept

    def add(new: list[tuple[str, str]]) -> bool:
        nonlocal total
        for name, text in new:
            if max_bytes is not None and total + len(text) > max_bytes:
                return False
            docs.append((name, text))
            total += len(text)
        return True

    if topics:
        for name, text in sorted(help_topics(root).items()):
            paras = [p for p in text.split("\n\n")]
            # help topics keep their code samples and grammar; dedup by the same near-exact key
            paras = [p for p in paras if p.strip() and (len(p) >= 20 and near_key(p) not in seen)]
            for p in paras:
                seen.add(near_key(p))
            if paras and not add(pack(name, paras, doc_bytes)):
                return docs
    if docstrings:
        for path in source_files(root):
            try:
                source = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            paragraphs = fresh([p for t in docstrings_and_comments(source) for p in prose_paragraphs(t)])
            if paragraphs:
                module = str(path.relative_to(root).with_suffix("")).replace(os.sep, ".")
                if not add(pack(module, paragraphs, doc_bytes)):
                    return docs
    if not docs:
        raise BltError(f"found no help topics or docstrings under {root}")
    return docs


def packaged_text(filename: str) -> str:
    """A text file shipped xz-compressed in `blt/experiments/data`, with Unix line ends."""
    packed = resources.files("blt.experiments").joinpath(f"data/{filename}.xz").read_bytes()
    return lzma.decompress(packed).decode("utf-8").replace("\r\n", "\n")


def shakespeare_corpus(doc_bytes: int = PLAY_DOC_BYTES) -> list[tuple[str, str]]:
    """(name, text) documents of the packaged tiny Shakespeare, cut at blank lines (between speeches) into
    documents of about `doc_bytes`, in the file's order."""
    text = packaged_text("tinyshakespeare.txt")
    return pack("shakespeare", [p for p in text.split("\n\n") if p.strip()], doc_bytes)


def between(text: str, start: str, end: str) -> str:
    """`text` from the first `start` to the last `end`, both excluded: a book without its front and back matter."""
    first, last = text.index(start) + len(start), text.rindex(end)
    return text[first:last]


def joined_paragraphs(text: str) -> list[str]:
    """The paragraphs of hard-wrapped prose, each on one line with its spacing collapsed."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


_BOX_DRAWING = re.compile("[\u2500-\u257f]")
_ASCII_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def lexicon_paragraphs(text: str) -> list[str]:
    """The entries of a lexicon in dictd's format (a headword at column 0, its pronunciation and part of speech
    on the next line, its definition indented below) as paragraphs: "headword, n. The definition ...", then
    the entry's further paragraphs; cross-reference braces dropped, curly quotes made straight."""
    paragraphs = []
    for entry in re.split(r"\n(?=\S)", text):
        head, _, body = entry.partition("\n")
        head = head.strip()
        blocks = [b.replace("\xad", "") for b in joined_paragraphs(body) if not _BOX_DRAWING.search(b)]  # no tables
        if len(blocks) < 2:  # a headword without a definition
            continue
        grammar = re.search(r"[a-z][a-z., ]*\.$", blocks[0])  # "/pro'nun·see·AY·shun/, n." -> "n."
        paragraphs.append(f"{head}, {grammar.group(0)} {blocks[1]}" if grammar else f"{head}: {blocks[1]}")
        paragraphs.extend(blocks[2:])
    return [
        p.replace("{ ", "")
        .replace("{", "")
        .replace("}", "")
        .replace("\u201c ", "\u201c")
        .replace(" \u201d", "\u201d")
        .translate(_ASCII_QUOTES)
        for p in paragraphs
    ]


def books_corpus(doc_bytes: int = DOC_BYTES) -> list[tuple[str, str]]:
    """(name, text) documents of the four packaged books, in this order: the prose in paragraphs of one line
    each, the workshop's proceedings through the same prose filter as the docstrings (which drops its lists,
    tables and directory of participants), the poem line by line as printed, the lexicon an entry a paragraph,
    in documents of about `doc_bytes` (the poem `PLAY_DOC_BYTES`)."""
    alice = between(packaged_text("alice29.txt"), "\n\n\n", "THE END").replace("`", "'")  # its opening quote
    workshop = between(packaged_text("lcet10.txt"), "INTRODUCTION\n", "\n                                   END")
    poem = "\n".join(line.rstrip() for line in packaged_text("plrabn12.txt").splitlines())
    poem = between(poem, "\nParadise Lost\n", "[The End]")
    lexicon = between(packaged_text("jargon-4.4.7.txt"), "29 Dec 2003\u201d.)\n", "\n !$&'()")  # a dictd index line
    return (
        pack("alice", joined_paragraphs(alice), doc_bytes)
        + pack("workshop", prose_paragraphs(workshop), doc_bytes)
        + pack("paradise-lost", poem.strip("\n").splitlines(), PLAY_DOC_BYTES, sep="\n")
        + pack("jargon", lexicon_paragraphs(lexicon), doc_bytes)
    )
