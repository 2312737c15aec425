"""Experiment configs: Python files with get_config() (sweeps: get_sweep()), loaded by path."""
import importlib.util
import types


def load_module(path: str, name: str = '_config_file') -> types.ModuleType:
  """Runs the Python file at `path` as a module named `name` and returns it (callers check for
  the function they need and name the file in their error)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
