"""Built-in on-disk layouts; each module registers its builders in ``mola.data.registry.SCENARIOS``."""

from mola.data.layouts import (  # noqa: F401  (imported for their registrations)
    digits,
    folder,
    manytask,
    medmnist,
    multidigit,
    nyuv2,
    office_caltech10,
    paper,
    radimagenet,
    shifted_digits,
    tasks,
)
