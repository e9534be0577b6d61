"""HTML building blocks of the report: text is escaped unless it is `Markup` (HTML built here), tables,
embedded PNG figures (data URIs) and number formats."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from typing import Any, Optional, Union


class Markup(str):
    """HTML built by this module (or escaped already): inserted as it is, never escaped again."""


Content = Union[str, Markup, None, Sequence["Content"]]


def escape(content: Content) -> Markup:
    """`content` as HTML: plain text escaped (quotes included), Markup as it is, a sequence joined, None empty."""
    if content is None:
        return Markup("")
    if isinstance(content, Markup):
        return content
    if isinstance(content, str):
        return Markup(html.escape(content, quote=True))
    return Markup("".join(escape(part) for part in content))


def tag(name: str, content: Content = None, **attributes: Any) -> Markup:
    """`<name attributes>content</name>`; attribute values escaped, a trailing underscore dropped from a
    name (`class_`), underscores inside it written as hyphens (`data_value`), None-valued ones left out."""
    attrs = "".join(
        f' {key.rstrip("_").replace("_", "-")}="{html.escape(str(value), quote=True)}"'
        for key, value in attributes.items() if value is not None
    )
    return Markup(f"<{name}{attrs}>{escape(content)}</{name}>")


def paragraph(content: Content, class_: Optional[str] = None) -> Markup:
    """A <p> of `content`."""
    return tag("p", content, class_=class_)


def preformatted(text: str) -> Markup:
    """Text shown as it is written (a config file), escaped."""
    return tag("pre", text)


def details(summary: Content, content: Content, open_: bool = False) -> Markup:
    """A collapsible block titled `summary`."""
    return Markup(f"<details{' open' if open_ else ''}>{tag('summary', summary)}{escape(content)}</details>")


class Cell:
    """A table cell whose shown `text` may stand for a more precise `value` (its tooltip), optionally
    marked with a class (e.g. `loss` for a highlighted drop)."""

    def __init__(self, text: Content, value: Any = None, class_: Optional[str] = None) -> None:
        self.text, self.value, self.class_ = text, value, class_

    def render(self, header: bool = False) -> Markup:
        """The <td> (or <th>) of this cell."""
        title = None if self.value is None else repr(self.value) if isinstance(self.value, float) else str(self.value)
        return tag("th" if header else "td", self.text, class_=self.class_, title=title)


def number(value: Any, digits: int = 3, class_: Optional[str] = None) -> Cell:
    """A cell for a measured number: `digits` decimals (a thousands separator for integers), '-' for a missing
    or non-finite value, the exact value as the tooltip."""
    if value is None or isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return Cell("-" if value is None else str(value), class_=class_)
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"
    return Cell(text, value, class_="num" if class_ is None else f"num {class_}")


def signed(value: Any, digits: int = 3, class_: Optional[str] = None) -> Cell:
    """A cell for a difference: with its sign (+0.101), '-' when missing."""
    if value is None or not isinstance(value, Real) or not math.isfinite(value):
        return Cell("-")
    return Cell(f"{value:+.{digits}f}", value, class_="num" if class_ is None else f"num {class_}")


def table(
    header: Sequence[Content], rows: Iterable[Sequence[Union[Cell, Content]]], id_: Optional[str] = None,
    caption: Content = None,
) -> Markup:
    """A <table> with a header row and body rows; a row's items are Cells or content (text escaped)."""
    head = tag("tr", [Cell(text).render(header=True) for text in header])
    body = [
        tag("tr", [(item if isinstance(item, Cell) else Cell(item)).render() for item in row])
        for row in rows
    ]
    return tag("table", [tag("caption", caption) if caption else None, tag("thead", head), tag("tbody", body)], id=id_)


def definition_list(items: Mapping[str, Content]) -> Markup:
    """A <dl> of label -> content."""
    return tag("dl", [Markup(f"{tag('dt', label)}{tag('dd', value)}") for label, value in items.items()])


def png_image(png: bytes, alt: str) -> Markup:
    """An <img> holding `png` as a base64 data URI (the page needs no other file)."""
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return Markup(f'<img src="{source}" alt="{html.escape(alt, quote=True)}">')


def figure(png: bytes, caption: str) -> Markup:
    """A <figure> of an embedded PNG and its caption (also the image's alt text)."""
    return tag("figure", [png_image(png, caption), tag("figcaption", caption)])


def si(value: Any, digits: int = 3) -> Cell:
    """A cell for a large count with an SI suffix and `digits` significant digits (1.23G, 45.6M, 789K), the
    exact value as the tooltip; '-' when missing."""
    if value is None or isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        return Cell("-")
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return Cell(f"{value / scale:.{digits}g}{suffix}", value, class_="num")
    return Cell(f"{value:.{digits}g}", value, class_="num")
