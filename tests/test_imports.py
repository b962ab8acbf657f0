import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import tfreward
assert "tensorflow" not in sys.modules, "import tfreward must stay light"
for info in pkgutil.walk_packages(tfreward.__path__, "tfreward."):
  importlib.import_module(info.name)
banned = [m for m in ("official", "tf_keras", "torch", "jax") if m in sys.modules]
print("BANNED", banned)
"""


def test_package_imports_no_optional_extras():
  out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "BANNED []" in out.stdout
