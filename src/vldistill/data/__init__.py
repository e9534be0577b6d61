"""Data: the embedded synthetic pair set, pair datasets, preprocessing and the offline tokenizer."""
