"""Training objectives: one file each, registered by exact name in ``mmlm.registry.OBJECTIVES``."""

from mmlm.objectives._base import BackwardObjective, Objective, ObjectiveOptions, StepInfo, build_objectives

__all__ = ["BackwardObjective", "Objective", "ObjectiveOptions", "StepInfo", "build_objectives"]
