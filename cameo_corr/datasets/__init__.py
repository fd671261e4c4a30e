"""Dataset readers (RealEstate10K raw and pixelSplat chunks, CO3D v2, 7-Scenes RGB-D, nerfstudio
``transforms.json`` scenes, COLMAP reconstructions, synthetic scenes), the canonical training view
shared by pipeline and trainer, the synthetic generator, and the window planner (which S frames of which
scene form a window: :mod:`cameo_corr.datasets.planner`)."""

from cameo_corr.datasets.base import DATASET_NAMES, SceneReader, open_dataset

__all__ = ["DATASET_NAMES", "SceneReader", "open_dataset"]
