"""The README stays the door (issue 23 item 8): at most 300 lines, and every relative link in it
(pages under docs/, result files, anchors of Markdown pages) points at something that exists.
The rest of the documentation is the mkdocs site in docs/, whose own links `mkdocs build
--strict` checks in CI (.ci/run)."""

import os
import re
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
MAX_LINES = 300
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def _prose(text):
  """The lines of a Markdown text outside fenced code blocks."""
  lines, fenced = [], False
  for line in text.splitlines():
    if _FENCE.match(line.strip()):
      fenced = not fenced
      continue
    if not fenced:
      lines.append(line)
  return lines


def _slug(title):
  """Python-Markdown's toc slugify (what mkdocs uses for heading anchors)."""
  title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading: its text
  title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
  title = re.sub(r"[^\w\s-]", "", title).strip().lower()
  return re.sub(r"[-\s]+", "-", title)


def _anchors(path):
  with open(path, encoding="utf-8") as f:
    return {_slug(line.lstrip("#").strip()) for line in _prose(f.read())
            if re.match(r"#{1,6} ", line)}


def _relative_links(text):
  for line in _prose(text):
    for target in _LINK.findall(line):
      if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
        continue
      yield target


def test_readme_is_at_most_300_lines():
  with open(README, encoding="utf-8") as f:
    n = len(f.read().splitlines())
  assert n <= MAX_LINES, (
      f"README.md has {n} lines (at most {MAX_LINES}): move the detail to a page under docs/ "
      "and link it")


def test_readme_links_point_at_existing_files_and_anchors():
  with open(README, encoding="utf-8") as f:
    text = f.read()
  links = list(_relative_links(text))
  assert any(t.startswith("docs/") for t in links), "the README links the documentation site"
  broken = []
  for target in links:
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(REPO, path)) if path else README
    if not os.path.exists(full):
      broken.append(f"{target}: no file {path}")
    elif anchor and full.endswith(".md") and anchor not in _anchors(full):
      broken.append(f"{target}: {path or 'README.md'} has no heading with anchor #{anchor}")
  assert not broken, "README.md links to what does not exist:\n" + "\n".join(broken)


def test_the_site_includes_the_readme_python_api_example():
  # docs/networks.md includes the example by these markers (pymdownx.snippets), so it is written
  # once, where tests/test_networks.py runs it.
  with open(README, encoding="utf-8") as f:
    text = f.read()
  start, end = "--8<-- [start:python-api]", "--8<-- [end:python-api]"
  assert start in text and end in text and text.index(start) < text.index(end)
  with open(os.path.join(REPO, "docs", "networks.md"), encoding="utf-8") as f:
    assert '--8<-- "README.md:python-api"' in f.read()
