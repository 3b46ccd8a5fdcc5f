"""The command line (`maxdeeplab VERB`) and the benchmarks: the application layer."""
