"""Training batches built in memory from the synthetic generator, without TensorFlow.

For benchmarks and tests on machines without TensorFlow (the GPU machine has none): the same
batch contract as ``pipeline.train_dataset`` (``transforms.image_spec`` with a [P, 2] lead, plus
``match_valid`` and ``element``), rendered and encoded in numpy.
"""

from __future__ import annotations

import numpy as np

from data_pipeline import annotations, synthetic, transforms


def synthetic_pair_batch(num_pairs: int, geometry: transforms.ImageGeometry, *,
                         image_size: int, seed: int = 0, first_pair: int = 0,
                         flip: bool = False) -> dict[str, np.ndarray]:
  """Image pairs ``first_pair ..`` of the synthetic training split (seed), encoded.

  Element p is (user image, shop image) of synthetic pair_id first_pair + p + 1.
  """
  elements = []
  for p in range(first_pair, first_pair + num_pairs):
    encoded = []
    for index in (2 * p + 1, 2 * p):  # user, shop
      r = synthetic.render_example(seed, 0, index, image_size)
      h, w = r.image.shape[:2]
      record = annotations.parse_raw_annotation(r.annotation, f"synthetic[{index}]",
                                                index + 1, "", w, h)
      encoded.append(transforms.encode_image(record, r.image[:, :, ::-1].copy(), geometry,
                                             flip))
    elements.append({k: np.stack([e[k] for e in encoded]) for k in encoded[0]})
  batch = {k: np.stack([e[k] for e in elements]) for k in elements[0]}
  batch["match_valid"] = np.ones(num_pairs, bool)
  batch["element"] = np.arange(first_pair, first_pair + num_pairs, dtype=np.int64)
  return batch
