"""One colour per label, the same in every output that draws labels (RTSTRUCT ROIs, SEG segments, review page,
overlay figures): label 1 red as the paper's GTV, then colours that stay apart from each other and from the yellow
of the uncertainty ROI."""
from __future__ import annotations

LABEL_COLOURS = ((255, 0, 0), (0, 128, 255), (0, 200, 80), (255, 0, 255), (0, 220, 220), (255, 128, 0),
                 (140, 80, 255), (170, 110, 40), (255, 120, 160), (120, 160, 0))
UNCERTAIN_COLOUR = (255, 200, 0)


def label_colour(label: int) -> tuple[int, int, int]:
    """RGB of foreground label ``label`` (1, 2, ...); the palette repeats after ten labels."""
    return LABEL_COLOURS[(label - 1) % len(LABEL_COLOURS)]


def label_colour_hex(label: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*label_colour(label))
