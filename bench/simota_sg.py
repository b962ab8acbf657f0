"""Child of bench/simota.py: super-gradients' own `YoloXDetectionLoss` ("exact") and `YoloXFastDetectionLoss`
("fast") on the benchmark problem, in PyTorch (2 threads), run by a Python that has torch and super-gradients:

  python bench/simota.py --reference-python /path/to/venv/bin/python

Super-gradients is used unchanged, as installed (`pip install --no-deps super-gradients`): its package __init__
pulls in most of its training stack (opencv, torchvision, omegaconf, ...), so only the loss module
`super_gradients/training/losses/yolox_loss.py` is loaded, by file path. Its five imports from the rest of
super-gradients get stand-ins: the loss-registry decorator (a no-op), the loss-name constants, the logger, the torch
version check (super-gradients' own `version_utils.py`, loaded by path) and `calculate_bbox_iou_matrix` (with its
helper `_iou`, taken by name from super-gradients' installed `detection_utils.py`, whose module imports would need
opencv and torchvision). Nothing of super-gradients is copied here.

Prints one JSON line per variant: median time, peak memory, the loss components and the foreground count.

Peak memory: the growth of the resident set over one call (after the warm-up), sampled every 0.2 ms by a thread,
measured in a second process (`--memory`) in which glibc returns every block of 128 KiB or more to the system when it
is freed (MALLOC_MMAP_THRESHOLD_=131072, MALLOC_TRIM_THRESHOLD_=0; by default it keeps freed memory for reuse, and
the growth after a warm-up would read 0). PyTorch's CPU allocator does not cache, so this is the working memory of
the call's large tensors. The timed process runs with glibc's defaults.
"""

import argparse
import ast
import importlib.util
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from simota import make_problem  # noqa: E402  (numpy only; the same problem from the same seed)


def _rss_bytes():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_delta(fn, interval=2e-4):
  """Largest resident-set growth over the RSS before `fn`, sampled by a thread every `interval` seconds."""
  base = _rss_bytes()
  peak = [base]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_bytes())
      time.sleep(interval)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    fn()
  finally:
    done.set()
    thread.join()
  peak[0] = max(peak[0], _rss_bytes())
  return peak[0] - base


def load_super_gradients_loss():
  """The installed super-gradients loss module, loaded by path with stand-ins for its package imports."""
  spec = importlib.util.find_spec("super_gradients")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("super_gradients is not installed")
  root = list(spec.submodule_search_locations)[0]

  def package(name):
    module = types.ModuleType(name)
    module.__path__ = []
    sys.modules[name] = module
    return module

  for name in ("super_gradients", "super_gradients.common", "super_gradients.common.abstractions",
               "super_gradients.common.registry", "super_gradients.training", "super_gradients.training.utils",
               "super_gradients.training.losses"):
    package(name)

  object_names = types.ModuleType("super_gradients.common.object_names")
  object_names.Losses = types.SimpleNamespace(YOLOX_LOSS="YoloXDetectionLoss", YOLOX_FAST_LOSS="YoloXFastDetectionLoss")
  sys.modules[object_names.__name__] = object_names
  registry = types.ModuleType("super_gradients.common.registry.registry")
  registry.register_loss = lambda *args, **kwargs: (lambda cls: cls)
  sys.modules[registry.__name__] = registry
  abstract_logger = types.ModuleType("super_gradients.common.abstractions.abstract_logger")
  abstract_logger.get_logger = logging.getLogger
  sys.modules[abstract_logger.__name__] = abstract_logger

  def load(name, relative):
    module_spec = importlib.util.spec_from_file_location(name, os.path.join(root, relative))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module

  version_utils = load("super_gradients.training.utils.version_utils", "training/utils/version_utils.py")
  sys.modules["super_gradients.training.utils"].torch_version_is_greater_or_equal = (
      version_utils.torch_version_is_greater_or_equal)

  # detection_utils.py imports cv2/torchvision at module level: run only the two functions the loss uses.
  import torch
  path = os.path.join(root, "training/utils/detection_utils.py")
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  wanted = {"_iou", "calculate_bbox_iou_matrix"}
  tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
  if {node.name for node in tree.body} != wanted:
    raise ImportError(f"{path} does not define {sorted(wanted)}")
  detection_utils = types.ModuleType("super_gradients.training.utils.detection_utils")
  detection_utils.__dict__.update(math=math, torch=torch)
  exec(compile(tree, path, "exec"), detection_utils.__dict__)  # noqa: S102
  sys.modules[detection_utils.__name__] = detection_utils

  return load("super_gradients.training.losses.yolox_loss", "training/losses/yolox_loss.py")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=640)
  parser.add_argument("--classes", type=int, default=80)
  parser.add_argument("--max-objects", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--grad", action="store_true")
  parser.add_argument("--warmup", type=int, default=2, help="calls before timing (PyTorch's allocator warms up)")
  parser.add_argument("--variants", default="fast,exact")
  parser.add_argument("--memory", action="store_true", help="only measure memory (see the module docstring)")
  args = parser.parse_args()

  try:
    import torch
    yolox_loss = load_super_gradients_loss()
  except ImportError as error:
    print(json.dumps({"error": f"not installed ({error})"}))
    return
  if args.memory and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)  # glibc reads these at start-up
  torch.set_num_threads(2)
  outputs, _, _, _, rows = make_problem(args.batch, args.size, args.classes, args.max_objects)
  targets = torch.from_numpy(rows)
  for variant in args.variants.split(","):
    cls = yolox_loss.YoloXFastDetectionLoss if variant == "fast" else yolox_loss.YoloXDetectionLoss
    criterion = cls(strides=[8, 16, 32], num_classes=args.classes)
    preds = [torch.from_numpy(o)[:, None].clone().requires_grad_(args.grad) for o in outputs]  # [B, 1, h, w, D]

    def run():
      if args.grad:
        loss, components = criterion(preds, targets)
        loss.backward()
        for p in preds:
          p.grad = None
      else:
        with torch.no_grad():
          loss, components = criterion(preds, targets)
      return components

    start = time.perf_counter()
    components = run()
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
      run()
    if args.memory:
      print(json.dumps({"mode": f"sg_{variant}", "peak_rss_mb": peak_rss_delta(run) / 2**20}), flush=True)
      continue
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    c = components.tolist()
    print(json.dumps({"mode": f"sg_{variant}", "first_call_s": first, "median_s": statistics.median(times),
                      "times_s": times, "total": c[5], "iou": c[0], "obj": c[1],
                      "cls": c[2], "num_fg": int(round(c[4] * max(len(rows), 1))),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
  main()
