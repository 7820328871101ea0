"""Test-wide settings: offline hub, no telemetry, one torch thread (2 shared cores), fp64 where asked."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import hyperinf_ops.query  # noqa: E402

# The curation SQL under test is this checkout's sql/: an editable install made from another checkout (a git
# worktree shares the main checkout's virtualenv) maps `hyperinf_ops.sql` to that checkout's folder.
hyperinf_ops.query.SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
