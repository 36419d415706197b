"""Fixtures shared by tests/seeds and tests/scaling: a tiny model folder and a cue-word task file."""

from seeds.study_fixtures import cue_task, tiny_model_dir  # noqa: F401
