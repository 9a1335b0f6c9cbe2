"""Files in: decoding, the labelled dataset and its splits, duplicates, atomic writes, input sanity checks."""
