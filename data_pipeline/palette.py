"""The colors and shapes both synthetic tiers draw with (data_pipeline/synthetic.py: one shape per image;
data_pipeline/compositional.py: several, with relations and counts). Kept apart so each tier imports
these and neither imports the other's module at load time."""
from __future__ import annotations

from PIL import ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 220, 30),
    "purple": (130, 40, 170), "orange": (245, 135, 20), "white": (255, 255, 255), "black": (0, 0, 0),
}
# Colors the demo never trains on: `ldm demo --finetune` teaches one to the finished model with LoRA. Kept out of
# COLORS so the base data (drawn from COLORS) and its judge are unchanged; the finetune's judge reads both.
NEW_COLORS: dict[str, tuple[int, int, int]] = {"pink": (255, 110, 190)}
ALL_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, **NEW_COLORS}
SHAPES = ("circle", "square", "triangle")


def draw_shape(pen: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
               fill: tuple[int, int, int]) -> None:
    """One filled shape in the inclusive box (x0, y0, x1, y1); triangles apex up. Shared by both tiers."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        pen.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        pen.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        pen.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
