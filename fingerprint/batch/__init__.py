"""Whole studies in one command: BIDS / QSIPrep discovery, plans, resumable runs, reports.

>>> from fingerprint.batch import StudyOptions, plan_study, run_study
>>> plan = plan_study("bids", "derivatives/fingerprint", StudyOptions(models=("noddi",)))
>>> rows, totals = run_study(plan)
"""

from fingerprint.batch.layout import Series, find_series
from fingerprint.batch.runner import StudyOptions, StudyPlan, plan_study, run_study

__all__ = ["Series", "StudyOptions", "StudyPlan", "find_series", "plan_study", "run_study"]
