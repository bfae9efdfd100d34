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
