"""ImageNet weights for the ResNet backbone: torchvision state dicts -> Flax variables.

Where to get the file: torchvision's ``ResNet50_Weights.IMAGENET1K_V1``,
https://download.pytorch.org/models/resnet50-0676ba61.pth, the ImageNet backbone that
torchvision's own Mask R-CNN (``maskrcnn_resnet50_fpn``) is trained from.
``IMAGENET1K_V2`` (https://download.pytorch.org/models/resnet50-11ad3fa6.pth) loads too (same
names and shapes), and so do timm's ResNet-50 ``.safetensors`` files, which use the same names.

Reading a ``.pth``/``.pt`` file needs torch; a ``.safetensors`` file needs only the
``safetensors`` package. To convert once, on a machine with torch::

  python -c "import torch; from safetensors.torch import save_file; \\
save_file(torch.load('resnet50-0676ba61.pth'), 'resnet50.safetensors')"

Input normalisation: these weights were trained on RGB in 0..1 normalised with mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). ``resnet.normalize_image`` computes
(x - 255 * mean) / (255 * std) on 0..255 RGB (``IMAGENET_MEAN_RGB``/``IMAGENET_STD_RGB`` are
those constants times 255), which is the same number: (x / 255 - mean) / std. The images the
data pipeline feeds the model are RGB, so no channel swap is needed.

Name mapping (the inverse of the table in ``resnet.py``'s docstring): a Flax path maps to a
torch name by turning ``layerK_J`` into ``layerK.J``, ``downsample_conv`` into ``downsample.0``,
``downsample_bn`` into ``downsample.1`` and ``kernel`` into ``weight``; conv kernels are
transposed from torch's OIHW to Flax's HWIO; the batch-norm ``weight``, ``bias``,
``running_mean`` and ``running_var`` go to the "constants" collection under the same names.
``fc.*`` (the ImageNet classifier) and ``*.num_batches_tracked`` are ignored; every other
tensor must match a model variable in name and shape, and every model variable must be in the
file, else a ValueError lists the problems. The mapping works for any ``stage_sizes``/``width``
whose names and shapes agree with the file.

Checkpoint wrappers: a dict whose only content is under ``"state_dict"`` or ``"model"`` (as
training scripts often save it) is unwrapped, and a ``"module."`` prefix on every name
(``DataParallel``) is stripped. Anything else is taken as the state dict itself and checked
name by name.

The GroupNorm variant (``norm="GN"``) has no batch-norm statistics to receive them: loading
into it raises a ValueError.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]

PTH_EXTENSIONS = (".pth", ".pt")
SAFETENSORS_EXTENSIONS = (".safetensors",)
BN_NAMES = ("weight", "bias", "running_mean", "running_var")
_WRAPPER_KEYS = ("state_dict", "model")
_MODULE_PREFIX = "module."
_BLOCK_RE = re.compile(r"^layer(\d+)_(\d+)$")
_MAX_LISTED = 10

_CONVERT_HINT = (
    "python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('resnet50-0676ba61.pth'), 'resnet50.safetensors')\"")


# ------------------------------------------------------------------------------------------------
# Reading files.


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
  """The state dict inside `obj`: {"state_dict": sd} / {"model": sd} unwrapped, "module."
  stripped when every name has it."""
  if not isinstance(obj, Mapping):
    raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  while len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS and isinstance(
      next(iter(obj.values())), Mapping):
    obj = next(iter(obj.values()))
  if obj and all(isinstance(k, str) and k.startswith(_MODULE_PREFIX) for k in obj):
    obj = {k[len(_MODULE_PREFIX):]: v for k, v in obj.items()}
  return obj


def _read_pth(path: str) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"{path}: reading a .pth/.pt file needs torch, which is not installed. Install torch, "
        f"or convert the file to .safetensors once on a machine with torch, e.g. "
        f"{_CONVERT_HINT}, and pass the .safetensors file instead.") from e
  obj = _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
  out = {}
  for name, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor; expected "
                       "a state dict (name -> tensor)")
    value = value.detach().cpu()
    if value.is_floating_point():  # bfloat16 has no numpy dtype; float32 is what we keep
      value = value.to(torch.float32)
    out[name] = value.numpy()
  return out


def _read_safetensors(path: str) -> dict[str, Any]:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return dict(_unwrap(load_file(path), path))


def read_state_dict(path: str | os.PathLike) -> StateDict:
  """Reads a torchvision-style ResNet state dict.

  Args:
    path: a ``.pth``/``.pt`` file (``torch.save`` of a state dict; needs torch) or a
      ``.safetensors`` file (needs only the safetensors package).

  Returns:
    {torch name: numpy array}, names as in torchvision (wrappers and "module." removed, see the
    module docstring). Floating tensors come back as float32 from .pth files and in the stored
    dtype from .safetensors.

  Raises:
    FileNotFoundError: no such file.
    ValueError: an extension other than .pth/.pt/.safetensors, or not a state dict.
    ImportError: a .pth/.pt file without torch installed (the message says how to convert).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"ResNet weights file not found: {path}")
  ext = os.path.splitext(path)[1].lower()
  if ext in PTH_EXTENSIONS:
    return _read_pth(path)
  if ext in SAFETENSORS_EXTENSIONS:
    return _read_safetensors(path)
  raise ValueError(f"{path}: unknown extension {ext!r} for ResNet weights; expected one of "
                   f"{PTH_EXTENSIONS + SAFETENSORS_EXTENSIONS}")


# ------------------------------------------------------------------------------------------------
# Name mapping.


def _key_str(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def torch_name(path: tuple[str, ...]) -> str:
  """The torchvision name of a ResNet variable at Flax `path` (below "params"/"constants").

  ("layer1_0", "downsample_conv", "kernel") -> "layer1.0.downsample.0.weight",
  ("bn1", "running_var") -> "bn1.running_var". Raises ValueError for a variable that has no
  torchvision counterpart (e.g. GroupNorm's "scale").
  """
  parts = []
  for i, part in enumerate(path):
    last = i == len(path) - 1
    m = _BLOCK_RE.match(part)
    if m and not last:
      parts += [f"layer{m.group(1)}", m.group(2)]
    elif part == "downsample_conv" and not last:
      parts += ["downsample", "0"]
    elif part == "downsample_bn" and not last:
      parts += ["downsample", "1"]
    elif part == "kernel" and last:
      parts.append("weight")
    elif last and part not in BN_NAMES:
      raise ValueError(f"{'/'.join(path)} has no torchvision counterpart")
    else:
      parts.append(part)
  return ".".join(parts)


def is_ignored(name: str) -> bool:
  """Whether a torch tensor is deliberately not loaded: the classifier and BN's step counter."""
  return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(int(d) for d in x.shape)


def _fmt(shape: tuple[int, ...]) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


def resnet_variables_from_state_dict(state_dict: Mapping[str, Any], params: Any, constants: Any,
                                     *, source: str = "<state dict>") -> tuple[Any, Any]:
  """The ResNet's (params, constants) with every value taken from a torchvision state dict.

  Args:
    state_dict: {torch name: array} (see `read_state_dict`).
    params: the ResNet's "params" tree (nested dicts; leaves arrays or ShapeDtypeStructs), as
      from ``ResNet().init`` or ``jax.eval_shape``; only names, shapes and dtypes are used.
    constants: the ResNet's "constants" tree (the frozen batch-norm vectors).
    source: the file name, for error messages.

  Returns:
    (params, constants) with exactly the input structures, leaves numpy arrays in the
    template's dtype (float32 for the project's models): conv kernels transposed OIHW -> HWIO.

  Raises:
    ValueError: one message naming every problem (the first 10 listed, plus counts): tensors
      of the file the model lacks (unexpected), model variables the file lacks (missing), shape
      mismatches (torch name, Flax path, both shapes), non-floating tensors; or a template
      without batch-norm constants (norm="GN").
  """
  collections = {"params": params, "constants": constants}
  flat = {c: jax.tree_util.tree_flatten_with_path(t)[0] for c, t in collections.items()}
  paths = {c: [tuple(_key_str(k) for k in p) for p, _ in leaves] for c, leaves in flat.items()}
  not_conv = ["/".join(p) for p in paths["params"] if p[-1] != "kernel"]
  if not paths["constants"] or not_conv:
    raise ValueError(
        f"{source}: the ResNet template has no batch-norm constants to receive the file's "
        f"batch-norm statistics (params that are not conv kernels: {not_conv[:3]}); ImageNet "
        "weights load only into norm='FrozenBN', not the GroupNorm variant (norm='GN')")

  # torch name -> (collection, Flax path, template leaf)
  expected: dict[str, tuple[str, tuple[str, ...], Any]] = {}
  for c in collections:
    for path, (_, leaf) in zip(paths[c], flat[c]):
      expected[torch_name(path)] = (c, path, leaf)

  problems: list[str] = []
  counts = {"unexpected": 0, "missing": 0, "shape mismatch": 0, "not floating": 0}
  values: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
  for name, value in state_dict.items():
    if is_ignored(name):
      continue
    if name not in expected:
      counts["unexpected"] += 1
      problems.append(f"unexpected tensor {name!r} {_fmt(_shape(value))}: the model has no "
                      "such variable")
      continue
    c, path, leaf = expected[name]
    flax_path = f"{c}/{'/'.join(path)}"
    want = _shape(leaf)
    value = np.asarray(value)
    is_conv = path[-1] == "kernel"
    torch_want = (want[3], want[2], want[0], want[1]) if is_conv and len(want) == 4 else want
    if _shape(value) != torch_want:
      counts["shape mismatch"] += 1
      layout = " (OIHW; HWIO " + _fmt(want) + ")" if is_conv else ""
      problems.append(f"shape mismatch for {name!r}: file {_fmt(_shape(value))}, model "
                      f"{flax_path} expects {_fmt(torch_want)}{layout}")
      continue
    if not np.issubdtype(value.dtype, np.floating):
      counts["not floating"] += 1
      problems.append(f"{name!r} has dtype {value.dtype}, expected a floating tensor")
      continue
    if is_conv:
      value = np.transpose(value, (2, 3, 1, 0))
    values[(c, path)] = np.ascontiguousarray(value, dtype=leaf.dtype)
  for name, (c, path, _) in expected.items():
    if name not in state_dict:
      counts["missing"] += 1
      problems.append(f"missing tensor {name!r} (model variable {c}/{'/'.join(path)})")

  if problems:
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise ValueError(f"{source}: cannot load it into the ResNet ({summary}):\n  {listed}{more}")

  def take(c):
    return lambda p, _: values[(c, tuple(_key_str(k) for k in p))]

  return (jax.tree_util.tree_map_with_path(take("params"), params),
          jax.tree_util.tree_map_with_path(take("constants"), constants))


def load_backbone_weights(variables: Mapping[str, Any], path: str | os.PathLike, *,
                          backbone: str = "backbone") -> dict[str, Any]:
  """A whole model's variables with its ResNet replaced by the file's ImageNet weights.

  Args:
    variables: {"params": {..., backbone: ...}, "constants": {..., backbone: ...}, ...}, e.g.
      ``MatchRCNN``'s variables (its ResNet submodule is "backbone"); leaves may be arrays or
      ShapeDtypeStructs.
    path: a .pth/.pt or .safetensors file (see `read_state_dict`).
    backbone: the name of the ResNet submodule.

  Returns:
    A new dict: variables["params"][backbone] and variables["constants"][backbone] are the
    file's values (numpy, see `resnet_variables_from_state_dict`); every other entry is the same
    object as in `variables`.
  """
  source = os.fspath(path)
  if backbone not in variables.get("params", {}):
    raise ValueError(f"variables['params'] has no {backbone!r} subtree (has "
                     f"{sorted(variables.get('params', {}))})")
  state_dict = read_state_dict(source)
  params, constants = resnet_variables_from_state_dict(
      state_dict, variables["params"][backbone],
      variables.get("constants", {}).get(backbone, {}), source=source)
  out = dict(variables)
  out["params"] = {**variables["params"], backbone: params}
  out["constants"] = {**variables["constants"], backbone: constants}
  ignored = [k for k in state_dict if is_ignored(k)]
  counters = sum(k.endswith(".num_batches_tracked") for k in ignored)
  listed = sorted(k for k in ignored if not k.endswith(".num_batches_tracked"))
  listed += [f"{counters} *.num_batches_tracked"] if counters else []
  log.info("Loaded %d ResNet tensors from %s into %r; ignored %d%s",
           len(state_dict) - len(ignored), source, backbone, len(ignored),
           f" ({', '.join(listed)})" if listed else "")
  return out
