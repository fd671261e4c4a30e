"""cameo-corr: offline correspondence cache and lean trainer for CAMEO.

Subpackages: :mod:`cameo_corr.schemas` (the contract), :mod:`cameo_corr.datasets` (readers, canonical
view, synthetic scenes), :mod:`cameo_corr.pipeline` (geometry backends, token correspondences, cache),
:mod:`cameo_corr.train` (streaming loader, model, CAMEO loss, training loop).
"""

__version__ = "0.1.0"
