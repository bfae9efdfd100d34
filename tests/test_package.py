"""The public API resolves, and the console script is wired to the CLI."""

import rag_ray
from rag_ray.cli import build_parser


def test_every_public_name_resolves():
    for name in rag_ray.__all__:
        assert getattr(rag_ray, name) is not None, name


def test_cli_has_every_subcommand():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # argparse keeps them here
    assert set(choices) == {"index", "search", "eval-retrieval", "eval-qa", "ask", "serve", "swap-index", "quickstart", "train", "compare"}


def test_index_build_stages_import_neither_torch_nor_transformers():
    """Every Ray worker that runs an index stage imports its module: the route tasks, the skip
    counter and the shard actors must not pay torch's and transformers' import (seconds of CPU and
    hundreds of MiB each); only the embedding actor loads them."""
    import subprocess
    import sys

    code = ("import sys, rag_ray.indexing, rag_ray.corpus, rag_ray.shards, rag_ray.shard; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
