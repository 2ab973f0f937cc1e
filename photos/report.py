"""The browsable discovery report: a self-contained HTML page (one row of thumbnails per person, images inlined) and a
PNG contact sheet per person.

Rows are separated by a band of ``ROW_SEPARATOR`` colour, ``SEPARATOR_PX`` high, which the headless-browser test
counts in a screenshot.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

ROW_SEPARATOR = (255, 0, 255)
SEPARATOR_PX = 6
THUMB_PX = 64
SHEET_COLUMNS = 8
LOW_CONFIDENCE_COLOUR = "#e08000"
GALLERY_COLOUR = "#2060d0"


@dataclass
class Thumb:
    """One face in the report: its aligned crop, caption (photo file), and whether it is a gallery face or a
    low-confidence assignment."""

    image: Image.Image
    caption: str
    gallery: bool = False
    low_confidence: bool = False


@dataclass
class PersonRow:
    """One person of the report: a gallery name or ``new_001``..., and their faces."""

    name: str
    known: bool
    faces: list[Thumb] = field(default_factory=list)


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").resize((THUMB_PX, THUMB_PX), Image.BILINEAR).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(rows: Sequence[PersonRow], title: str, summary: str) -> str:
    """The self-contained page: a header, then one row per person in the given order."""
    sep = "#{:02x}{:02x}{:02x}".format(*ROW_SEPARATOR)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{margin:0;font-family:sans-serif;background:#fff}",
        "header{padding:8px 12px}h1{font-size:18px;margin:0 0 4px}p{margin:0;font-size:13px;color:#444}",
        f".row{{display:flex;flex-wrap:wrap;align-items:center;padding:6px 12px;border-top:{SEPARATOR_PX}px solid "
        f"{sep}}}",
        ".name{width:170px;font-size:14px}.name small{display:block;color:#666}",
        f"img{{width:{THUMB_PX}px;height:{THUMB_PX}px;margin:2px;border:3px solid transparent}}",
        f"img.gallery{{border-color:{GALLERY_COLOUR}}}img.low{{border-color:{LOW_CONFIDENCE_COLOUR}}}",
        "</style></head><body><header>",
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>",
        "<p>Blue frame: gallery face; orange frame: low-confidence assignment.</p></header>",
    ]
    for row in rows:
        photos = sum(not f.gallery for f in row.faces)
        kind = "known" if row.known else "new"
        parts.append(
            f"<div class='row' id='{html.escape(row.name)}'><div class='name'><b>{html.escape(row.name)}</b>"
            f"<small>{kind}: {photos} face(s) in the photos</small></div>"
        )
        for face in row.faces:
            cls = "gallery" if face.gallery else ("low" if face.low_confidence else "")
            parts.append(
                f"<img class='{cls}' src='{_data_uri(face.image)}' title='{html.escape(face.caption)}' "
                f"alt='{html.escape(face.caption)}'>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def contact_sheet(row: PersonRow, side: int = 112, columns: int = SHEET_COLUMNS) -> Image.Image:
    """A grid of the person's aligned faces under a caption line; gallery faces framed in blue, low-confidence ones
    in orange."""
    count = max(1, len(row.faces))
    cols = min(columns, count)
    lines = math.ceil(count / cols)
    header = 24
    sheet = Image.new("RGB", (cols * side, header + lines * side), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), f"{row.name} ({'known' if row.known else 'new'}, {len(row.faces)} faces)", fill=(0, 0, 0))
    for i, face in enumerate(row.faces):
        x, y = (i % cols) * side, header + (i // cols) * side
        sheet.paste(face.image.convert("RGB").resize((side, side), Image.BILINEAR), (x, y))
        colour = GALLERY_COLOUR if face.gallery else (LOW_CONFIDENCE_COLOUR if face.low_confidence else None)
        if colour:
            draw.rectangle([x, y, x + side - 1, y + side - 1], outline=colour, width=3)
    return sheet
