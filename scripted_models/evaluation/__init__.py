"""Evaluation: metrics, baselines, PathoSyn validation study, speed benchmarks."""
