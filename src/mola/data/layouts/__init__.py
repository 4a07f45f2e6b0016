"""Built-in on-disk layouts; each module registers its builders in ``mola.data.registry.SCENARIOS``."""
