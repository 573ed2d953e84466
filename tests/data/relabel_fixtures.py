r"""The real DeepFashion2 fixtures relabelled into another taxonomy (``relabel.COARSE3``).

  python tests/data/relabel_fixtures.py --out DIR

writes ``DIR/coco.json`` (3 coarse categories with ids 3, 7 and 12; tops keep 5 of their
landmarks, bottoms 3, dresses none; every third mask as an RLE; no pairs) and ``DIR/spec.json``
(flip pairs by name, sigmas) for the 16 fixture images
(``<repo>/../shared/fixtures/deepfashion2_real/coco.json``; DF2_FIXTURES names another folder,
as in tests/conftest.py), which stay in the fixture's image folder (``make`` returns it). The
own-taxonomy tests train, evaluate, predict and export on it. Not a test module (pytest collects
``test_*.py`` only).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from data_pipeline import relabel  # noqa: E402  pylint: disable=g-import-not-at-top


def fixtures_dir() -> Path:
  """The real DeepFashion2 fixtures: ``../shared`` beside the checkout, or DF2_FIXTURES."""
  env = os.environ.get("DF2_FIXTURES")
  if env:
    return Path(env)
  return ROOT.parent / "shared" / "fixtures" / "deepfashion2_real"


def make(out_dir: str | os.PathLike) -> tuple[str, str, str]:
  """(coco.json, spec.json, image folder) of the relabelled fixtures, written in ``out_dir``."""
  fixtures = fixtures_dir()
  json_path, spec_path = relabel.write_relabelled(fixtures / "coco.json", out_dir)
  return json_path, spec_path, str(fixtures / "image")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="folder for coco.json and spec.json")
  for path in make(parser.parse_args(argv).out):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
