"""The work one request may ask for, shared by `samadapt predict` and `samadapt serve`.

Both caps exist so that one input within the documented options cannot exhaust memory or hang the
process: the pixels of one image (checked from its header, before decoding) and the prompts of one
image (points in one prompt set, points a side of the automatic grid).
"""

MAX_PIXELS = 4096 * 4096  # one image's width x height (an 16.8 MP photo; SAM sees 1024 px anyway)
MAX_POINTS = 64  # points in one prompt set
MAX_POINTS_PER_SIDE = 64  # the automatic grid: 64^2 = 4096 single-point prompts (SAM's default is 32)
