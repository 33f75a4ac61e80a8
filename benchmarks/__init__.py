"""Speed measurements, run as `python -m benchmarks.<name>` from the repository root; never asserted in tests."""
