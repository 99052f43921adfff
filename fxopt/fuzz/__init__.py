"""Differential fuzzing of fxopt: seeded random models and pipelines, verified, shrunk.

    >>> from fxopt.fuzz import campaign
    >>> stats = campaign(seconds=60, seed=1, max_graphs=1, every_pass=False, pipelines_per_graph=1)
    >>> stats.graphs, stats.pipelines >= 1
    (1, True)

See docs/fuzzing.md and `python tools/fuzz.py --help`.
"""
from .models import FuzzModel, build, make_input, random_spec
from .runner import (FAILURES, CampaignStats, Outcome, campaign, random_case, random_pipeline, run_case,
                     save_regression, shrink)

__all__ = ["FAILURES", "CampaignStats", "FuzzModel", "Outcome", "build", "campaign", "make_input",
           "random_case", "random_pipeline", "random_spec", "run_case", "save_regression", "shrink"]
