"""Safe display text for prompts and responses: model output is untrusted input.

The text goes to `gr.Markdown`, which renders markdown in the browser. Before that, on the server:
- raw HTML is escaped (`&` and `<` outside code), so `<script>` or `<img onerror=...>` shows as text;
- inline code becomes `<code>` with every character entity-escaped, so neither HTML nor markdown inside it acts;
- fenced code blocks become `<pre><code>` HTML blocks, escaped (and highlighted by Pygments when it knows the
  language) here, so no part of the model's text reaches the browser's markdown parser as raw HTML, whatever
  that parser makes of the fences;
- link and image targets whose scheme is not http, https or mailto (javascript:, data:, vbscript:, ...) are
  replaced by "#blocked";
- images are never loaded: `![alt](url)` becomes the text "[image: alt]" and the URL as code, and any other
  image syntax (`![alt][ref]`) loses its "!" magic, so a browser showing model output or an annotator's text
  fetches nothing (which would tell the URL's owner the page was viewed). The app's Content-Security-Policy
  (images only from the app itself or data: URLs) is the second layer.
Gradio's own HTML sanitiser (`sanitize_html=True`) is a second layer, not the one we rely on.
"""

from __future__ import annotations

import functools
import html
import re
from typing import Any

SAFE_SCHEMES = ("http", "https", "mailto")
BLOCKED_TARGET = "#blocked"

# A CommonMark fence: up to 3 spaces, then 3+ backticks or tildes; a backtick fence's info string has no backtick.
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
# Inline link or image target: "](" then optional whitespace, then the target up to whitespace or ")".
INLINE_TARGET = re.compile(r"(\]\(\s*)([^\s)]*)")
# Reference definition: "[label]: target" (the label may hold code spans, hence the lazy match).
REFERENCE_TARGET = re.compile(r"^( {0,3}\[.*?\]:\s*)(\S+)", re.MULTILINE)
SCHEME = re.compile(r"^([a-z][a-z0-9+.\-]*):")
# An inline image: ![alt](target "title"); the target may sit in <...>.
INLINE_IMAGE = re.compile(r"!\[([^\]\n]*)\]\(\s*<?([^\s)>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]+")
# Characters that mean something to markdown: entity-encoded inside inline code so they stay literal.
MARKDOWN_PUNCTUATION = set("\\`*_{}[]()#+-.!|~<>&\"'$")


@functools.lru_cache(maxsize=4096)  # a pure function of the text; every screen renders two responses
def safe_markdown(text: str | None) -> str:
    """Markdown for `gr.Markdown` that displays `text` with its formatting and no active HTML or unsafe links."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    for is_code, block in split_fences(text):
        out.append(code_block(block) if is_code else escape_prose(block))
    return "\n".join(out)


def code_block(block: str) -> str:
    """A fenced block (fence lines included) as an escaped <pre><code> HTML block, blank lines around it."""
    lines = block.split("\n")
    opening = FENCE.match(lines[0])
    marker, info = opening.group(2), opening.group(3).strip()
    body = lines[1:]
    if body and is_closing_fence(body[-1], marker):
        body = body[:-1]
    first_word = info.split()[0] if info else ""
    language = first_word if re.fullmatch(r"[A-Za-z0-9_+\-.]{1,30}", first_word) else ""
    code = "\n".join(body)
    inner = highlight(code, language)
    css_class = f' class="language-{language}"' if language else ""
    return f"\n<pre><code{css_class}>{inner}</code></pre>\n"


def highlight(code: str, language: str) -> str:
    """Escaped code, coloured with inline styles when Pygments knows the language; markdown characters in the
    text are entity-encoded, so the block stays literal even if a markdown parser reads it as a paragraph."""
    html_code = None
    tools = pygments_tools(language.lower()) if language else None
    if tools is not None:
        from pygments import highlight as pygmentize

        html_code = pygmentize(code, *tools)
    if html_code is None:
        return "".join(encode_char(c) for c in code)
    # Pygments output is tags plus escaped text: encode markdown characters in the text parts only.
    return re.sub(r"(?<=>)([^<]+)|^([^<]+)", lambda m: encode_text(m.group(0)), html_code.rstrip("\n"))


@functools.lru_cache(maxsize=64)
def pygments_tools(language: str):
    """(lexer, formatter) for a language Pygments knows, else None; built once each (a formatter builds its
    whole style table, a few ms)."""
    try:
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import get_lexer_by_name
        from pygments.util import ClassNotFound
    except ImportError:
        return None
    try:
        return get_lexer_by_name(language), html_formatter(HtmlFormatter)
    except ClassNotFound:
        return None


@functools.lru_cache(maxsize=1)
def html_formatter(formatter_class):
    return formatter_class(nowrap=True, noclasses=True)


def encode_text(escaped: str) -> str:
    """Entity-encode markdown characters in already HTML-escaped text (entities like &lt; stay as they are)."""
    parts = re.split(r"(&[#a-zA-Z0-9]+;)", escaped)
    return "".join(part if part.startswith("&") and part.endswith(";") else
                   "".join(encode_char(c) if c not in "&<>" else c for c in part) for part in parts)


def split_fences(text: str) -> list[tuple[bool, str]]:
    """Split into (is_fenced_code, text) blocks. An unclosed fence runs to the end, as in CommonMark."""
    blocks: list[tuple[bool, str]] = []
    prose: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None or (opening.group(2)[0] == "`" and "`" in opening.group(3)):
            prose.append(lines[i])
            i += 1
            continue
        if prose:
            blocks.append((False, "\n".join(prose)))
            prose = []
        marker = opening.group(2)
        end = i + 1
        while end < len(lines) and not is_closing_fence(lines[end], marker):
            end += 1
        blocks.append((True, "\n".join(lines[i : end + 1])))
        i = end + 1
    if prose:
        blocks.append((False, "\n".join(prose)))
    return blocks


def is_closing_fence(line: str, marker: str) -> bool:
    stripped = line.strip()
    return (
        len(line) - len(line.lstrip(" ")) <= 3
        and len(stripped) >= len(marker)
        and set(stripped) == {marker[0]}
    )


def escape_prose(text: str) -> str:
    """Escape HTML outside code spans, turn code spans into escaped <code>, and block unsafe link targets."""
    # Targets first, on the whole block: a link's text may hold a code span, which would split it in two.
    text = INLINE_TARGET.sub(lambda m: m.group(1) + safe_target(m.group(2)), text)
    text = REFERENCE_TARGET.sub(lambda m: m.group(1) + safe_target(m.group(2)), text)
    parts: list[str] = []
    for is_code, piece in split_code_spans(text):
        if is_code:
            parts.append("<code>" + "".join(encode_char(c) for c in piece) + "</code>")
        else:
            start = 0
            for image in INLINE_IMAGE.finditer(piece):
                parts += [escape_text(piece[start : image.start()]), image_as_text(image)]
                start = image.end()
            parts.append(escape_text(piece[start:]))
    return "".join(parts)


def escape_text(text: str) -> str:
    # Only & and < can start markup; leaving > alone keeps "> quote" blockquotes working. "![" left over (a
    # reference-style image) is defused to "!\[", which shows as typed.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("![", "!\\[")


def image_as_text(match: re.Match) -> str:
    """An image as its alt text and its URL, both as inert text (the URL in code): nothing links or loads it."""
    alt = encode_text(html.escape(match.group(1).strip(), quote=False))
    target = encode_text(html.escape(match.group(2), quote=False))
    return f"&#91;image: {alt}&#93;" + (f" <code>{target}</code>" if target else "")


def bidi(markdown: str) -> str:
    """Markdown in a block whose direction follows its text (dir="auto"): Arabic or Hebrew reads right to left."""
    return f'<div dir="auto">\n\n{markdown}\n\n</div>' if markdown else markdown


def split_code_spans(text: str) -> list[tuple[bool, str]]:
    """(is_code, text) pieces: a run of n backticks opens a span closed by the next run of exactly n backticks;
    a backslash-escaped backtick opens nothing; an unmatched run is literal text."""
    pieces: list[tuple[bool, str]] = []
    start = 0  # beginning of the pending prose piece
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 2
            continue
        if text[i] != "`":
            i += 1
            continue
        run = len(text) - i - len(text[i:].lstrip("`"))
        close = find_backtick_run(text, i + run, run)
        if close is None:
            i += run
            continue
        if start < i:
            pieces.append((False, text[start:i]))
        content = text[i + run : close].replace("\n", " ")
        if content.startswith(" ") and content.endswith(" ") and content.strip():
            content = content[1:-1]
        pieces.append((True, content))
        i = start = close + run
    if start < len(text):
        pieces.append((False, text[start:]))
    return pieces


def find_backtick_run(text: str, start: int, length: int) -> int | None:
    for match in re.finditer(r"`+", text[start:]):
        if len(match.group()) == length:
            return start + match.start()
    return None


def encode_char(char: str) -> str:
    if char in MARKDOWN_PUNCTUATION:
        return f"&#{ord(char)};"
    return char


def safe_target(target: str) -> str:
    """The link target if its scheme is allowed (or it has none: a relative link or an anchor), else #blocked."""
    normalised = html.unescape(html.unescape(target))
    normalised = CONTROL_OR_SPACE.sub("", normalised).replace("\\", "").lstrip("<'\"").lower()
    scheme = SCHEME.match(normalised)
    if scheme is None:
        # No scheme, but a colon before any "/", "?" or "#" could still be read as one by a lenient parser.
        head = re.split(r"[/?#]", normalised, maxsplit=1)[0]
        return BLOCKED_TARGET if ":" in head else target
    return target if scheme.group(1) in SAFE_SCHEMES else BLOCKED_TARGET


def prompt_markdown(messages: list[dict[str, Any]]) -> str:
    """A prompt (chat messages) as safe markdown: the last user turn plain, earlier turns labelled by role."""
    if len(messages) == 1:
        return bidi(safe_markdown(messages[0].get("content", "")))
    blocks = []
    for message in messages:
        role = html.escape(str(message.get("role", "")))
        blocks.append(f"**{role}:**\n\n{bidi(safe_markdown(message.get('content', '')))}")
    return "\n\n---\n\n".join(blocks)
