"""Pipeline tools over the two trained stages: sample, evaluate, compress/decompress, anomaly scores, FID."""
