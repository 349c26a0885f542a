"""Validation studies: each rule is a YAML written before its runs (with the compare suites it reads) and applied by
`python -m benchmarks.studies.defaults RULE.yaml`; docs/RESULTS.md shows their outcomes."""
