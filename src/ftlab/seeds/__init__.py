"""Seed studies: grids of runs that differ only in their seeds (data order, initialisation of
new parameters, MeZO's perturbations), and the statistics that say how far one run can be
trusted (multi-bootstrap, expected maximum performance, variance shares, interpolation barriers)."""

from ftlab.seeds.runner import (
                                SEED_KINDS,
                                RunSpec,
                                SeedStudyConfig,
                                check_comparable,
                                load_records,
                                load_study,
                                plan_runs,
                                run_study,
                                study_train_config,
)
from ftlab.seeds.stats import (
                                Interval,
                                expected_max_curve,
                                interpolation_barrier,
                                multi_bootstrap,
                                multi_bootstrap_samples,
                                summary,
                                variance_shares,
)

__all__ = ["SEED_KINDS", "RunSpec", "SeedStudyConfig", "check_comparable", "load_records", "load_study",
           "plan_runs", "study_train_config", "run_study", "Interval", "interpolation_barrier", "expected_max_curve",
           "multi_bootstrap", "multi_bootstrap_samples", "summary", "variance_shares"]
