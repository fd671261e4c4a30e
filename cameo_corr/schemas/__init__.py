"""The versioned contract between the cameo-corr readers, pipeline, cache and trainer.

Everything another part of the project may rely on lives here, one module per concern:

* :mod:`.errors`: the errors raised on bad input, which always name the file and the field or line;
* :mod:`.cameras`: camera conventions (OpenCV, world-to-camera, pixel intrinsics with pixel centres at
  +0.5) and the helpers that convert to and from them (RealEstate10K normalized intrinsics, PyTorch3D
  NDC cameras);
* :mod:`.tokens`: token grids, token coordinates and indices;
* :mod:`.records`: the records that flow through the pipeline (:class:`FrameRecord`,
  :class:`SceneRecord`, :class:`WindowRecord`, :class:`WindowData`, :class:`PointmapResult`,
  :class:`TokenCorrespondences`) and the stable window and shard ids;
* :mod:`.cache`: the cache layout (schema version 2, version 1 still read): array names, dtypes,
  shapes, the per-grid array paths of a cache holding several token grids, ``cache.json``;
* :mod:`.manifest`: the manifest columns.

Every name is importable from ``cameo_corr.schemas`` itself.
"""

from cameo_corr.schemas.cache import (
    CACHE_ARRAYS,
    GRID_ARRAYS,
    IMAGE_ARRAYS,
    IMAGE_FORMATS,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    VALUES_VERSION,
    ArraySpec,
    CacheConfig,
    array_key,
    validate_image_arrays,
    validate_window_arrays,
)
from cameo_corr.schemas.cameras import (
    CANONICAL_SIZE,
    CO3D_INTRINSICS_FORMATS,
    camera_centers,
    first_invalid_camera,
    intrinsics_from_normalized,
    intrinsics_to_normalized,
    invert_extrinsics,
    make_extrinsics,
    opencv_to_pytorch3d,
    pixel_centers,
    project,
    pytorch3d_to_opencv,
    unproject_depth,
    validate_camera,
)
from cameo_corr.schemas.errors import CameoCorrError, DatasetError, SchemaError
from cameo_corr.schemas.manifest import MANIFEST_COLUMNS, WINDOW_STATUSES, manifest_schema
from cameo_corr.schemas.records import (
    FrameRecord,
    PointmapResult,
    SceneRecord,
    TokenCorrespondences,
    WindowData,
    WindowIdHasher,
    WindowRecord,
    shard_id_of,
    window_id,
)
from cameo_corr.schemas.tokens import (
    DEFAULT_GRID,
    DEFAULT_TAU,
    MAX_TOKENS,
    as_grid,
    check_grids,
    grid_name,
    parse_grids,
    pixel_to_token,
    token_coords,
)

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_SCHEMA_VERSIONS",
    "VALUES_VERSION",
    "DEFAULT_GRID",
    "DEFAULT_TAU",
    "CANONICAL_SIZE",
    "MAX_TOKENS",
    "CameoCorrError",
    "SchemaError",
    "DatasetError",
    "intrinsics_from_normalized",
    "intrinsics_to_normalized",
    "make_extrinsics",
    "invert_extrinsics",
    "camera_centers",
    "project",
    "pixel_centers",
    "unproject_depth",
    "pixel_to_token",
    "token_coords",
    "as_grid",
    "parse_grids",
    "check_grids",
    "grid_name",
    "CO3D_INTRINSICS_FORMATS",
    "pytorch3d_to_opencv",
    "opencv_to_pytorch3d",
    "validate_camera",
    "first_invalid_camera",
    "FrameRecord",
    "SceneRecord",
    "window_id",
    "WindowIdHasher",
    "shard_id_of",
    "WindowRecord",
    "WindowData",
    "PointmapResult",
    "TokenCorrespondences",
    "ArraySpec",
    "CACHE_ARRAYS",
    "GRID_ARRAYS",
    "IMAGE_ARRAYS",
    "IMAGE_FORMATS",
    "array_key",
    "validate_image_arrays",
    "validate_window_arrays",
    "MANIFEST_COLUMNS",
    "WINDOW_STATUSES",
    "manifest_schema",
    "CacheConfig",
]
