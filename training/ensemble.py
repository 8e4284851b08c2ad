"""Validation accuracy of models as a distillation teacher: what `training.train --distill` would learn from.

    python -m training.ensemble --data ../shared/data/fer2013 runs/vgg-s2/best.h5 runs/vgg-lkd/best.h5

Averages each model's probabilities on every validation face and its mirror image (geometric mean, as
``teacher_targets``) and prints the accuracy of every subset of the given models, so a user can pick the
teacher set with the highest ceiling before spending hours on a student.
"""
from __future__ import annotations

import argparse
import itertools
import sys

from training.data import DataError, load_dataset
from training.train import teacher_targets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="Keras .h5 files (best.h5 of training runs) or .tflite bundles")
    p.add_argument("--data", required=True)
    p.add_argument("--cache-dir", default=".cache/fer-data", help="decoded-dataset cache (as training.train)")
    a = p.parse_args(argv)
    try:
        val = load_dataset(a.data, cache_dir=a.cache_dir)["val"]
        for r in range(1, len(a.models) + 1):
            for subset in itertools.combinations(a.models, r):
                q = teacher_targets(list(subset), val.x, temperature=1.0)
                print(f"{(q.argmax(1) == val.y).mean():.4f}  {' + '.join(subset)}", flush=True)
    except DataError as e:
        print(f"training.ensemble: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
