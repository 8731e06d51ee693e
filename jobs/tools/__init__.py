"""Evaluation and research tools (codec evaluation, EnCodec context probing, a loopback Ray cluster for tests and benchmarks); not installed with the package."""
