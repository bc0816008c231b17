"""Curriculum and prioritized problem sampling (SPEC.md section 3)."""

from curriculum.sampler import CurriculumSampler
from curriculum.schedules import piecewise
from curriculum.stats import ProblemStats

__all__ = ["CurriculumSampler", "ProblemStats", "piecewise"]
