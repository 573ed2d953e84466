r"""The real DeepFashion2 fixtures relabelled into another taxonomy (``relabel.COARSE3``).

  python tests/data/relabel_fixtures.py --out DIR

writes ``DIR/coco.json`` (3 coarse categories with ids 3, 7 and 12; tops keep 5 of their
landmarks, bottoms 3, dresses none; every third mask as an RLE; no pairs) and ``DIR/spec.json``
(flip pairs by name, sigmas) for the 16 fixture images, which stay in the fixture's image folder
(``make`` returns it). The own-taxonomy tests train, evaluate, predict and export on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import fixtures_dir  # noqa: E402
from data_pipeline import relabel  # noqa: E402


def make(out_dir: str | os.PathLike) -> tuple[str, str, str]:
  """(coco.json, spec.json, image folder) of the relabelled fixtures in ``out_dir``."""
  fixtures = fixtures_dir()
  with open(fixtures / "coco.json") as f:
    coco = json.load(f)
  json_path, spec_path = relabel.write(coco, str(out_dir))
  return json_path, spec_path, str(fixtures / "image")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  for path in make(parser.parse_args().out):
    print(path)
