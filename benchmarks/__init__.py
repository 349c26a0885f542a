"""Measurements of fedml-feddpd: `python -m benchmarks.<name>` from the repository root.

  speed      the speed benchmark (pretraining, sampling, DPO, scoring, whole runs), one JSON object
  backends   wall time, bytes and CPU of one config on sp, MPI and gRPC
  seeds      one config over several seeds, with overrides
  judge      how well a generator's samples match their class, by a classifier trained on unused real images
  studies/   the validation rules that chose defaults, each a YAML written before its runs and the script
             that applies it
"""
