"""The synthetic demo cohort (slides with known tissue classes, subtypes and simulated survival).

Only the demo rules, tests and benchmarks import this package; production code never does."""
