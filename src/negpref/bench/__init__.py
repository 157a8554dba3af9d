"""Benchmarks behind ``negpref bench``; each returns its figures as a dict."""
