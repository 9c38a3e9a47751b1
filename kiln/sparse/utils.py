"""spconv 2.x's ``spconv.pytorch.utils`` names: ``import kiln.sparse as spconv`` then ``spconv.utils.PointToVoxel``."""

from .voxelize import PointToVoxel

__all__ = ["PointToVoxel"]
