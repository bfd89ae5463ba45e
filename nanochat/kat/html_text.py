"""
HTML to plain text for Stack Exchange questions and answers (stdlib html.parser only).

Rules, chosen so a chat model sees text the way a reader of the page would:
- paragraphs, headings, lists, block quotes and <pre> blocks are separated by a blank line;
  <br> and list items start a new line (items as "- ");
- text inside <pre> is kept verbatim (code indentation and newlines matter), elsewhere runs of
  whitespace collapse to one space as a browser would;
- entities are unescaped (&amp; -> &, &lt; -> <), links keep their text, images and
  <script>/<style> contents are dropped.
"""

import re
from html.parser import HTMLParser

_BLOCK_TAGS = {"p", "div", "pre", "blockquote", "ul", "ol", "table", "hr",
               "h1", "h2", "h3", "h4", "h5", "h6"}
_LINE_TAGS = {"br", "tr"}
_DROPPED_TAGS = {"script", "style"}
_SPACES = re.compile(r"\s+")


class _TextCollector(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self.pre_depth = 0
        self.dropped_depth = 0
        self.at_line_start = True

    def _emit_break(self, newlines: str):
        self.chunks.append(newlines)
        self.at_line_start = True

    def handle_starttag(self, tag, attrs):
        if tag in _DROPPED_TAGS:
            self.dropped_depth += 1
        elif tag in _BLOCK_TAGS:
            self._emit_break("\n\n")
            if tag == "pre":
                self.pre_depth += 1
        elif tag in _LINE_TAGS:
            self._emit_break("\n")
        elif tag == "li":
            self._emit_break("\n")
            self.chunks.append("- ")  # the item's own text then starts without a space
        elif tag in ("td", "th"):
            self.chunks.append(" ")

    def handle_endtag(self, tag):
        if tag in _DROPPED_TAGS:
            self.dropped_depth = max(0, self.dropped_depth - 1)
        elif tag in _BLOCK_TAGS:
            if tag == "pre":
                self.pre_depth = max(0, self.pre_depth - 1)
            self._emit_break("\n\n")

    def handle_data(self, data):
        if self.dropped_depth:
            return
        if self.pre_depth:
            self.chunks.append(data)
            self.at_line_start = data.endswith("\n")
            return
        text = _SPACES.sub(" ", data)
        if self.at_line_start:
            text = text.lstrip(" ")
        if text:
            self.chunks.append(text)
            self.at_line_start = False


def html_to_text(html: str) -> str:
    """Readable plain text from an HTML fragment (see the module docstring for the rules)."""
    collector = _TextCollector()
    collector.feed(html)
    collector.close()
    text = "".join(collector.chunks)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")
