r"""The tiny run's outputs, fingerprinted: to show that a change leaves them as they were.

  python bench/tiny_outputs.py run --out /tmp/fp_before     # at the old commit
  python bench/tiny_outputs.py run --out /tmp/fp_after      # at the new one
  python bench/tiny_outputs.py compare /tmp/fp_before /tmp/fp_after

``run`` trains ``configs/tiny.py`` (20 steps, then its evaluation), predicts the synthetic
validation images (``--mode predict``), indexes their shop images and queries one user image
with the retrieval tool, each as the README's command, in ``OUT/run`` with the data in
``OUT/data``. It writes ``OUT/fingerprint.json``: the sha256 of every file each command wrote
(checkpoint params as arrays; ``metrics.json`` without its wall times, ``metrics.jsonl`` without
steps/s; absolute paths replaced by ``<OUT>``, so two folders compare), which ``compare`` sets
side by side (``digest`` writes it again from the outputs). Each command runs on the CPU in a subprocess; about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields of a wall-clock time: left out of the fingerprint.
_TIMES = ("timing", "steps_per_second")


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _scrub(obj, out: str):
  """``obj`` without wall times, with ``out`` written as <OUT>."""
  if isinstance(obj, dict):
    return {k: _scrub(v, out) for k, v in obj.items() if k not in _TIMES}
  if isinstance(obj, list):
    return [_scrub(v, out) for v in obj]
  if isinstance(obj, str):  # the path, and the path as a folder name (ground_truth/<name>)
    return obj.replace(out, "<OUT>").replace(out.replace("/", "_").strip("_"), "<OUT>")
  return obj


def _json_digest(path: str, out: str) -> str:
  with open(path) as f:
    return _sha(json.dumps(_scrub(json.load(f), out), sort_keys=True).encode())


def _file_digest(path: str, out: str) -> str:
  name = os.path.basename(path)
  if name.endswith(".jsonl"):
    lines = [json.dumps(_scrub(json.loads(l), out), sort_keys=True)
             for l in open(path) if l.strip()]
    return _sha("\n".join(lines).encode())
  if name.endswith(".json"):
    return _json_digest(path, out)
  with open(path, "rb") as f:
    return _sha(f.read())


def _tree(folder: str, out: str) -> dict[str, str]:
  found = {}
  for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
    if os.path.isfile(path) and not os.path.basename(path).startswith("."):
      found[os.path.relpath(path, folder)] = _file_digest(path, out)
  return found


def _params(checkpoints: str) -> dict[str, str]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from df2_jax import checkpoint  # pylint: disable=g-import-not-at-top
  found = {}
  for step in checkpoint.saved_steps(checkpoints):
    params, constants = checkpoint.restore_params(checkpoints, step)
    import jax  # pylint: disable=g-import-not-at-top
    leaves = jax.tree_util.tree_leaves_with_path({"params": params, "constants": constants})
    h = hashlib.sha256()
    for path, leaf in leaves:
      h.update(jax.tree_util.keystr(path).encode())
      h.update(np.ascontiguousarray(leaf).tobytes())
    found[f"step {step}"] = h.hexdigest()[:16]
  return found


def _run(cmd: list[str], log: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  print("+", " ".join(cmd), flush=True)
  with open(log, "w") as f:
    code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
  if code:
    sys.exit(f"{cmd[:3]} exited with {code}; see {log}")


def run(out: str) -> None:
  out = os.path.abspath(out)
  work, data = os.path.join(out, "run"), os.path.join(out, "data")
  os.makedirs(out, exist_ok=True)
  py = sys.executable
  _run([py, "run.py", "--config", "configs/tiny.py", "--workdir", work,
        f"--config.data.synthetic_dir={data}"], os.path.join(out, "train.log"))
  images = glob.glob(os.path.join(data, "*", "validation", "image"))[0]
  _run([py, "run.py", "--workdir", work, "--mode", "predict", "--input_dir", images,
        "--output_dir", os.path.join(out, "predictions")], os.path.join(out, "predict.log"))
  _run([py, "-m", "df2_jax.retrieval", "index", "--workdir", work, "--images", images,
        "--source", "shop", "--out", os.path.join(out, "index")], os.path.join(out, "index.log"))
  user = sorted(glob.glob(os.path.join(images, "*.jpg")))[0]
  _run([py, "-m", "df2_jax.retrieval", "query", "--index", os.path.join(out, "index"),
        "--image", user, "--top", "5", "--json", os.path.join(out, "query", "query.json"),
        "--out", os.path.join(out, "query", "query.png")], os.path.join(out, "query.log"))
  digest(out)


def digest(out: str) -> None:
  """Writes OUT/fingerprint.json of the outputs ``run`` left in ``out``."""
  out = os.path.abspath(out)
  work = os.path.join(out, "run")
  fingerprint = {
      "params": _params(os.path.join(work, "checkpoints")),
      "metrics.jsonl": _file_digest(os.path.join(work, "metrics.jsonl"), out),
      "evaluation": _tree(os.path.join(work, "eval_20"), out),
      "predictions": _tree(os.path.join(out, "predictions"), out),
      "index": _tree(os.path.join(out, "index"), out),
      "query": _tree(os.path.join(out, "query"), out),
  }
  with open(os.path.join(out, "fingerprint.json"), "w") as f:
    json.dump(fingerprint, f, indent=1, sort_keys=True)
  print(f"{os.path.join(out, 'fingerprint.json')}: "
        f"{sum(len(v) if isinstance(v, dict) else 1 for v in fingerprint.values())} entries")


def compare(a: str, b: str) -> int:
  load = lambda d: json.load(open(os.path.join(d, "fingerprint.json")))
  fa, fb = load(a), load(b)
  same = differ = 0
  for group in sorted(set(fa) | set(fb)):
    ga, gb = fa.get(group, {}), fb.get(group, {})
    if not isinstance(ga, dict):
      ga, gb = {"": ga}, {"": gb}
    for name in sorted(set(ga) | set(gb)):
      if ga.get(name) == gb.get(name):
        same += 1
      else:
        differ += 1
        print(f"differs: {group}/{name}: {ga.get(name, 'absent')} vs {gb.get(name, 'absent')}")
  print(f"{same} identical, {differ} different")
  return 1 if differ else 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run")
  r.add_argument("--out", required=True)
  d = sub.add_parser("digest", help="fingerprint.json again from the outputs of run")
  d.add_argument("--out", required=True)
  c = sub.add_parser("compare")
  c.add_argument("before")
  c.add_argument("after")
  args = parser.parse_args()
  if args.command in ("run", "digest"):
    (run if args.command == "run" else digest)(args.out)
    return 0
  return compare(args.before, args.after)


if __name__ == "__main__":
  sys.exit(main())
