"""Comment density of the repo's Python files: how far each is from STYLE.md's "about one comment line
in five".

    python bench/comment_density.py               # every tracked .py file outside tests/
    python bench/comment_density.py rl.py sft.py  # just these
    python bench/comment_density.py --below 0.15  # only the files under that share
    python bench/comment_density.py --rev main    # the files as they are at a git revision

Per file: non-blank lines, code lines, comment lines (of them: lines with a `#` comment, docstring
lines), and the share of comment lines among the non-blank ones. A comment line is a line holding a `#` comment (on its own or after code) or a line
of a docstring; a line with code and a trailing comment counts as code and as comment, so the share
is "how many lines carry an explanation", the measure STYLE.md means. Tool pragmas (`# noqa`,
`# type: ignore`, `# pragma`) explain nothing and are not counted. Reads files as text (ast and
tokenize); runs nothing, needs no GPU, no torch.
"""
import argparse
import ast
import io
import os
import subprocess
import sys
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRAGMAS = ("# noqa", "# type:", "# pragma", "# fmt:")
# tokens that are layout, not code: a line made only of these (and comments) is not a code line
LAYOUT = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}


def docstring_lines(tree):
    """Line numbers covered by the docstrings of the module, its classes and functions."""
    lines = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        # a docstring is the body's first statement when it is a bare string constant
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def count(text):
    """dict(lines=non-blank, code=, comment=, hash=lines with a # comment, doc=docstring lines,
    share=comment/non-blank) of one file's source `text`."""
    docs = docstring_lines(ast.parse(text))
    code, comment = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            if not tok.string.lower().startswith(PRAGMAS) and tok.string.strip("#! ").strip():
                comment.add(tok.start[0])
        elif tok.type not in LAYOUT and tok.start[0] not in docs:
            # a multi-line token (a long string) makes code of every line it spans
            code.update(range(tok.start[0], tok.end[0] + 1))
    hashed = len(comment)
    comment |= docs
    nonblank = sum(1 for line in text.splitlines() if line.strip())
    return dict(lines=nonblank, code=len(code), comment=len(comment), hash=hashed, doc=len(docs),
                share=len(comment) / max(1, nonblank))


def git(*cmd):
    return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def repo_files(rev=None):
    """Every .py file outside tests/ that git tracks (or would: untracked, not ignored), or that `rev` holds."""
    if rev:
        out = git("ls-tree", "-r", "--name-only", rev).split()
    else:
        out = [p for p in git("ls-files", "--cached", "--others", "--exclude-standard").split()
               if os.path.isfile(os.path.join(ROOT, p))]
    return sorted(p for p in out if p.endswith(".py") and not p.startswith("tests/"))


def read(path, rev=None):
    if rev:
        return git("show", f"{rev}:{path}")
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", help="files to measure, relative to the repo root (default: every tracked "
                   ".py file outside tests/)")
    p.add_argument("--below", type=float, default=None,
                   help="list only files whose comment share is under this (0.2 = one line in five)")
    p.add_argument("--rev", default=None, help="measure the files of this git revision (default: the working tree)")
    args = p.parse_args(argv)
    rows = [(path, count(read(path, args.rev))) for path in args.files or repo_files(args.rev)]
    print(f"{'file':34} {'lines':>6} {'code':>6} {'comment':>8} {'#':>5} {'doc':>5} {'share':>6}  1 in N")
    total = dict(lines=0, code=0, comment=0, hash=0, doc=0)
    for path, c in rows:
        for k in total:
            total[k] += c[k]
        if args.below is not None and c["share"] >= args.below:
            continue
        one_in = f"{c['lines'] / c['comment']:.1f}" if c["comment"] else "-"
        print(f"{path:34} {c['lines']:6d} {c['code']:6d} {c['comment']:8d} {c['hash']:5d} {c['doc']:5d} "
              f"{c['share']:6.2f}  {one_in}")
    share = total["comment"] / max(1, total["lines"])
    print(f"{'total':34} {total['lines']:6d} {total['code']:6d} {total['comment']:8d} {total['hash']:5d} "
          f"{total['doc']:5d} {share:6.2f}  {total['lines'] / max(1, total['comment']):.1f}")


if __name__ == "__main__":
    sys.exit(main())
