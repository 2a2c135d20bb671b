"""The mini world's concepts and tasks, as plain data (no code runs here).

Shapes, colours and the other attributes an image is drawn with, the rendering styles that play
the role of domains, and the mini-world tasks: which attribute a task classifies, in which style.
`react_vl.world` renders these; `react_vl.tasks` builds the tasks by name.
"""

# Class words (shape and colour names) never get synonyms, so a text tower sees them often.
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow"]
COLORS = {
    "red": (215, 35, 35), "orange": (245, 145, 20), "yellow": (240, 225, 40), "green": (40, 165, 55),
    "cyan": (40, 210, 220), "blue": (35, 70, 220), "purple": (135, 45, 185), "pink": (250, 130, 200),
}
TEXTURES = ["solid", "striped", "dotted", "checkered"]
# Object radius as a share of the image side: one big object per image, which a small base learns
# to name (smaller objects it learns slowly: docs/results/measurements-behind-defaults.md).
SIZES = {"small": 0.30, "medium": 0.35, "large": 0.40}
POSITIONS = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}
BACKGROUNDS = {"white": (235, 235, 230), "gray": (128, 128, 128), "beige": (205, 190, 160),
               "black": (40, 40, 45)}
STYLES = ["photo", "sketch", "night", "pixel"]

# Words that name each non-photo style in captions (tests check every such caption uses one).
STYLE_WORDS = {
    "sketch": ("sketch", "drawing", "drawn", "outline"),
    "night": ("night", "dark"),
    "pixel": ("pixel", "pixelated", "8-bit"),
}

# --- the tasks --------------------------------------------------------------------------------
# Targets ask for a rare style; controls for the dominant one (and pixel, which no target asks
# for). `tasks.get_task(name)` builds these by name; generate_world also writes them to WORLD/tasks.
MINI_TASKS = {
    "mini-shape-sketch": {"role": "target", "attribute": "shape", "style": "sketch", "templates": [
        "a sketch of a {}.", "a drawing of a {}.", "an outline drawing of a {}.", "a pencil sketch of a {}."]},
    "mini-color-night": {"role": "target", "attribute": "color", "style": "night", "templates": [
        "a photo of a {} object at night.", "a {} shape at night.", "a dark night photo of a {} object."]},
    "mini-shape-photo": {"role": "control", "attribute": "shape", "style": "photo", "templates": [
        "a photo of a {}.", "a picture of a {}.", "an image of a {}."]},
    "mini-color-photo": {"role": "control", "attribute": "color", "style": "photo", "templates": [
        "a photo of a {} object.", "a picture of a {} shape.", "a {} object."]},
    "mini-shape-pixel": {"role": "control", "attribute": "shape", "style": "pixel", "templates": [
        "pixel art of a {}.", "a pixelated {}.", "8-bit pixel art of a {}."]},
}
ATTRIBUTE_CLASSES = {"shape": SHAPES, "color": list(COLORS)}
TARGET_TASKS = [name for name, spec in MINI_TASKS.items() if spec["role"] == "target"]
CONTROL_TASKS = [name for name, spec in MINI_TASKS.items() if spec["role"] == "control"]
