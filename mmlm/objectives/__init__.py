"""Training objectives: one file each, registered by exact name in ``mmlm.registry.OBJECTIVES``."""

from mmlm.objectives._base import Objective, ObjectiveOptions, StepInfo, build_objectives

__all__ = ["Objective", "ObjectiveOptions", "StepInfo", "build_objectives"]
