"""The Colab notebooks stay in step with the code: every `!tfreward ...` line parses with the CLI's own parser, and
every config it trains loads with its `--set` overrides (with the TPU run's values of the notebook's variables); and
every notebook runs top to bottom in a real Jupyter kernel in smoke mode (its parameters cell set to SMOKE = True)."""

import glob
import json
import os
import re
import shlex
import sysconfig

import nbclient
import nbformat
import pytest

from tfreward import cli
from tfreward.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


# The values the notebooks' variables take in the TPU run (SMOKE = False); any other {expression} expands to nothing.
TPU_VALUES = {"STRATEGY": "tpu", "RUNS": "runs", "DATA": "", "SHORT": "",
              "CE_CONFIG": "configs/cityscapes/deeplabv3_r50_ce.yaml",
              "REWARD_CONFIG": "configs/cityscapes/deeplabv3_r50_reward.yaml"}


def _expand(line):
  return re.sub(r"\{([^{}]*)\}", lambda m: TPU_VALUES.get(m.group(1), ""), line)


def _commands(path):
  with open(path) as f:
    cells = json.load(f)["cells"]
  lines = [line.strip() for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
  return [shlex.split(_expand(line[1:]), comments=True)[1:] for line in lines if line.startswith("!tfreward ")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_commands_parse_and_configs_load(path):
  commands = _commands(path)
  assert commands, f"{path} runs no tfreward command"
  for argv in commands:
    args = cli._parser().parse_args(argv)
    if args.command == "train":
      config = load_config(os.path.join(REPO, args.config), args.overrides)
      assert config.runtime.strategy in ("tpu", "auto"), argv


# Runs first in the kernel: a shell command (`!tfreward ...`) that exits non-zero fails its cell (IPython itself only
# records the exit status in `_exit_code`).
CHECKED_SHELL = """
_ip = get_ipython()
_system = _ip.system
def _checked_system(cmd):
    _system(cmd)
    if _ip.user_ns.get("_exit_code", 0) != 0:
        raise RuntimeError(f"exit status {_ip.user_ns['_exit_code']}: !{cmd}")
_ip.system = _checked_system
"""


def test_every_notebook_has_one_parameters_cell():
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    params = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "SMOKE = False" in params[0].source, path


@pytest.mark.slow  # a few minutes each: several tfreward commands, each compiling its step
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_in_smoke_mode(path, monkeypatch):
  # The notebooks' `!tfreward` is the console script pip installed beside this interpreter (or in the user scheme).
  scripts = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
  monkeypatch.setenv("PATH", os.pathsep.join([*scripts, os.environ.get("PATH", "")]))
  notebook = nbformat.read(path, as_version=4)
  params = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
  params.source = "SMOKE = True"
  notebook.cells.insert(0, nbformat.v4.new_code_cell(CHECKED_SHELL))
  client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                   resources={"metadata": {"path": REPO}})
  client.execute()  # CellExecutionError on the first failing cell, with its traceback
