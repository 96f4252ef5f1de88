"""Labelled comparison grids, like A1111's X/Y plot: column labels on top, row labels on the left."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

PAD = 4
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def labelled_grid(
    rows: list[list[Image.Image]], column_labels: list[str], row_labels: list[str] | None = None, scale: int = 1
) -> Image.Image:
    """One image of `rows` x columns cells, each enlarged `scale` times (nearest neighbour, so tiny renders
    stay crisp), with a header row of `column_labels` and, when given, a left column of `row_labels`."""
    font = ImageFont.load_default()
    cell_w = max(image.width for row in rows for image in row) * scale
    cell_h = max(image.height for row in rows for image in row) * scale
    column_w = max([cell_w] + [_text_width(font, label) + 2 * PAD for label in column_labels])
    label_h = _line_height(font) + 2 * PAD
    left_w = max(_text_width(font, label) for label in row_labels) + 2 * PAD if row_labels else 0
    grid = Image.new("RGB", (left_w + column_w * len(column_labels), label_h + cell_h * len(rows)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(column_labels):
        x = left_w + column * column_w + (column_w - _text_width(font, label)) // 2
        draw.text((x, PAD), label, fill=INK, font=font)
    for row_index, row in enumerate(rows):
        top = label_h + row_index * cell_h
        if row_labels:
            draw.text((PAD, top + (cell_h - _line_height(font)) // 2), row_labels[row_index], fill=INK, font=font)
        for column, image in enumerate(row):
            cell = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
            grid.paste(cell, (left_w + column * column_w + (column_w - cell.width) // 2, top))
    return grid


def _text_width(font, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return right - left


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ag")
    return bottom
