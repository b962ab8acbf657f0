"""The Colab notebooks stay in step with the code: every `!tfreward ...` line parses with the CLI's own parser, and
every config it trains loads with its `--set` overrides."""

import glob
import json
import os
import shlex

import pytest

from tfreward import cli
from tfreward.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


def _commands(path):
  with open(path) as f:
    cells = json.load(f)["cells"]
  lines = [line.strip() for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
  return [shlex.split(line[1:], comments=True)[1:] for line in lines if line.startswith("!tfreward ")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_commands_parse_and_configs_load(path):
  commands = _commands(path)
  assert commands, f"{path} runs no tfreward command"
  for argv in commands:
    args = cli._parser().parse_args(argv)
    if args.command == "train":
      config = load_config(os.path.join(REPO, args.config), args.overrides)
      assert config.runtime.strategy in ("tpu", "auto"), argv
