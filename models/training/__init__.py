"""Training, split by concern (`seglock.models.train` re-exports the public names):

- `config`: the recipe's defaults in one place (`FitConfig`, `RECIPE`) and a run's options (`TrainConfig`);
- `loop`: `fit`, the epoch loop on datasets and a model;
- `checkpoint`: OUT/.checkpoint/last.pt, saved after every epoch and read back on `--resume`;
- `run`: `train`, data to artifact, with the run's key stored in a keystore or a key file.
"""
