"""The user-facing errors of `samadapt.recipes`: one base class the CLI turns into `error: ...` and exit 2.

Each module raises its own subclass; all of them live here so that no module imports the CLI (or
another recipe module) just to name an error.
"""


class UserError(Exception):
    """A problem with what the user asked for (bad path, bad value, unreadable file); the CLI
    prints its first line as `error: ...` and exits 2.
    """


class RecipeError(UserError, ValueError):
    """A recipe problem; the message lists every bad key with its fix."""


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on (NaN loss, ...); the message says what happened and what was kept."""


class PredictError(UserError, ValueError):
    """A user error of `samadapt predict` (exit 2, nothing written)."""


class PromptError(PredictError):
    """A malformed --box / --point string or prompts file (exit 2, nothing written)."""


class ImageReadError(UserError, ValueError):
    """An image or mask file could not be decoded (corrupt, truncated, not an image)."""


class EmptyDatasetError(UserError, ValueError):
    """A dataset found no image/mask pair."""


class UnpairedFilesError(UserError, ValueError):
    """`strict=True` and some images have no mask."""
