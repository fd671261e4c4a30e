"""The geometry: one window of canonical views in, token correspondences out.

* :mod:`.backends`: geometry backends (``depth``: ground-truth depth; ``vggt``: VGGT) turning a window
  into one shared-frame pointmap per view;
* :mod:`.match`: token pointmaps (``tokenize``) and exact all-pairs nearest neighbours with cycle masks
  (``correspond``), on CPU or GPU (KD-tree, faiss, torch);
* :mod:`.masks`: the mask policies (cycle consistency, visibility) and ``tau``;
* :mod:`.evaluate`: ``cameo-corr eval-corr``, correspondences scored against reprojection ground truth.

Nothing here knows about the cache or Ray: the job (:mod:`cameo_corr.job`) runs these functions inside
its stages, and the trainer reads what they produced from the cache (:mod:`cameo_corr.cache`).
"""
