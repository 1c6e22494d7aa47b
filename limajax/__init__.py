"""limajax: LIMA (Less Is More for Alignment, Zhou et al. 2023) reproduced in JAX."""

__version__ = "0.1.0"
