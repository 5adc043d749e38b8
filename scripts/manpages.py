#!/usr/bin/env python3
"""Write the man pages netd(8) and netd.yaml(5) from README.md's reference sections.

The README is the one source: each page is a list of README sections (by title)
turned from Markdown into man(7) roff, so nothing is written twice by hand. Only
Python's standard library is used, since the package build and scripts/install.sh run
this with the system's python3.

    python3 scripts/manpages.py --out DIR      # writes DIR/netd.8 and DIR/netd.yaml.5

The Markdown handled is what README.md uses: headings, paragraphs, pipe tables (turned
into tagged paragraphs), indented code blocks, "- " lists, `code`, **bold**, *italic*
and [links](target).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Page:
    """One man page: its name, section, one-line summary and the README sections in it."""

    name: str
    section: int
    summary: str
    title: str               # the header's centre: the manual it belongs to
    sections: tuple[str, ...]  # README "## " titles; a missing optional one is skipped
    optional: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()  # "### " subsections left out (install-script details)
    example: str = ""        # a file of the checkout shown verbatim under EXAMPLE


PAGES = (
    Page("netd", 8, "a super-server for Unix", "System Manager's Manual",
         ("Commands", "Running netd as a system service", "What a child gets", "Logs",
          "Unix sockets"),
         skip=("Install", "The end-to-end test")),
    Page("netd.yaml", 5, "netd's configuration file", "File Formats Manual",
         ("Configuration reference", "Access control, limits and the PROXY protocol"),
         optional=("Coming from inetd or xinetd",),
         example="etc/netd/netd.yaml"),
)
SEE_ALSO = {"netd": ("netd.yaml(5)", "systemctl(1)", "journalctl(1)", "inetd.conf(5)",
                     "update-inetd(8)"),
            "netd.yaml": ("netd(8)", "inetd.conf(5)", "services(5)")}


# -- reading the README ----------------------------------------------------------------


def split_sections(markdown: str) -> tuple[str, dict[str, list[str]]]:
    """The intro paragraph under the "# " title, and each "## " section's lines."""
    intro: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip(), [])
        elif current is not None:
            current.append(line)
        elif not line.startswith("# "):
            intro.append(line)
    paragraph = " ".join(" ".join(intro).split())
    return paragraph, sections


def drop_subsections(lines: list[str], titles: tuple[str, ...]) -> list[str]:
    """`lines` without the "### " subsections named in `titles`."""
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("### "):
            skipping = line[4:].strip() in titles
        if not skipping:
            kept.append(line)
    return kept


# -- Markdown to roff --------------------------------------------------------------------

INLINE = re.compile(r"`([^`]+)`|\*\*(.+?)\*\*|(?<![\w*])\*([^*\s][^*]*)\*|\[([^\]]+)\]\(([^)]+)\)")


def escape(text: str) -> str:
    """Text safe inside a roff line: backslashes, and the minus signs of options."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def inline(text: str) -> str:
    """Markdown inline markup to roff font changes; literal text is escaped."""
    out: list[str] = []
    pos = 0
    for m in INLINE.finditer(text):
        out.append(escape(text[pos:m.start()]))
        code, bold, italic, link_text, target = m.groups()
        if code is not None:
            out.append(f"\\fB{escape(code)}\\fR")
        elif bold is not None:
            out.append(f"\\fB{inline(bold)}\\fR")
        elif italic is not None:
            out.append(f"\\fI{inline(italic)}\\fR")
        else:
            shown = inline(link_text)
            out.append(shown if link_text.strip("`") == target else f"{shown} ({escape(target)})")
        pos = m.end()
    out.append(escape(text[pos:]))
    return "".join(out)


def text_line(text: str) -> str:
    """A roff text line: one starting with . or ' would be read as a request."""
    return "\\&" + text if text.startswith((".", "'")) else text


def table_cells(line: str) -> list[str]:
    """The cells of a pipe-table row (a backslash-escaped | stays in its cell)."""
    body = line.strip().strip("|")
    return [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", body)]


PLAIN_COLUMNS = ("meaning", "what it does", "what it is")


def table(rows: list[list[str]], header: list[str]) -> list[str]:
    """A table as tagged paragraphs: the first cell is the tag; the description column
    comes first under it, then each other column prefixed with its heading."""
    roff: list[str] = []
    for row in rows:
        roff += [".TP", text_line(inline(row[0]))]
        described, labelled = [], []
        for name, cell in zip(header[1:], row[1:], strict=True):
            if not cell:
                continue
            if name.lower() in PLAIN_COLUMNS or not name:
                described.append(inline(cell))
            else:
                labelled.append(f"{escape(name.capitalize())}: {inline(cell)}.")
        for i, part in enumerate(described + labelled):
            if i:
                roff.append(".br")
            roff.append(text_line(part))
    return roff


def markdown_to_roff(lines: list[str]) -> list[str]:
    """A README section's body to roff (its "### " subsections become .SS)."""
    roff: list[str] = []
    header: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("### "):
            roff.append(f'.SS "{escape(line[4:].strip().strip("`"))}"')
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(table_cells(lines[i]))
                i += 1
            if len(block) > 1 and all(set(c) <= set("-: ") for c in block[1]):
                header, block = block[0], block[2:]
            roff += table(block, header or [""] * len(block[0]))
        elif line.startswith("    "):
            code = []
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                code.append(lines[i][4:])
                i += 1
            while code and not code[-1].strip():
                code.pop()
            roff += [".PP", ".RS 4", ".nf"] + [text_line(escape(c)) for c in code]
            roff += [".fi", ".RE"]
        elif line.startswith("- "):
            while i < len(lines) and lines[i].startswith("- "):
                item = [lines[i][2:]]
                i += 1
                while i < len(lines) and lines[i].startswith("  ") and lines[i].strip():
                    item.append(lines[i].strip())
                    i += 1
                roff += [".IP \\(bu 2", text_line(inline(" ".join(item)))]
        else:
            paragraph = []
            while (i < len(lines) and lines[i].strip()
                   and not lines[i].startswith(("|", "### ", "    ", "- "))):
                paragraph.append(lines[i].strip())
                i += 1
            roff += [".PP", text_line(inline(" ".join(paragraph)))]
    return roff


# -- the pages ---------------------------------------------------------------------------


def synopsis(commands: list[str]) -> list[str]:
    """The command column of the README's command table, one usage a line."""
    usages = []
    for line in commands:
        if line.startswith("| `netd"):
            usages.append(table_cells(line)[0].strip("`"))
    return [".nf"] + [text_line(f"\\fB{escape(u)}\\fR") for u in usages] + [".fi"]


def render(page: Page, readme: str, version: str, date: str) -> str:
    """The whole roff source of `page`."""
    intro, sections = split_sections(readme)
    missing = [t for t in page.sections if t not in sections]
    if missing:
        raise SystemExit(f"manpages: README.md has no section {missing} for {page.name}"
                         f"({page.section})")
    roff = [f'.TH "{page.name.upper()}" "{page.section}" "{date}" "netd {version}" '
            f'"{page.title}"',
            ".\\\" Generated by scripts/manpages.py from README.md: edit that instead.",
            ".nh", ".ad l",
            ".SH NAME", f"{escape(page.name)} \\- {escape(page.summary)}"]
    if page.section == 8:
        roff += [".SH SYNOPSIS"] + synopsis(sections["Commands"])
        roff += [".SH DESCRIPTION", ".PP", text_line(inline(intro))]
    for title in page.sections + tuple(t for t in page.optional if t in sections):
        roff.append(f'.SH "{escape(title.upper())}"')
        roff += markdown_to_roff(drop_subsections(sections[title], page.skip))
    if page.example:
        roff += [".SH EXAMPLE", ".PP", f"\\fI{escape(page.example)}\\fR from netd's source:",
                 ".PP", ".RS 4", ".nf"]
        roff += [text_line(escape(line)) for line in
                 (REPO / page.example).read_text().rstrip("\n").splitlines()]
        roff += [".fi", ".RE"]
    roff += [".SH \"SEE ALSO\"", ", ".join(f"\\fB{escape(ref.split('(')[0])}\\fR"
                                           f"({ref.split('(')[1]}"
                                           for ref in SEE_ALSO[page.name])]
    return "\n".join(roff) + "\n"


def project_version() -> str:
    """netd.__version__, read from the source (netd itself need not be importable)."""
    text = (REPO / "netd" / "__init__.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if not match:
        raise SystemExit("manpages: no __version__ in netd/__init__.py")
    return match[1]


def page_date() -> str:
    """SOURCE_DATE_EPOCH when a package build sets it (reproducible builds), else the
    README's modification time."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    seconds = int(epoch) if epoch else int((REPO / "README.md").stat().st_mtime)
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def main(argv: list[str] | None = None) -> int:
    """Write every page into --out; print each path written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write into")
    args = parser.parse_args(argv)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    args.out.mkdir(parents=True, exist_ok=True)
    for page in PAGES:
        path = args.out / f"{page.name}.{page.section}"
        path.write_text(render(page, readme, project_version(), page_date()),
                        encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
