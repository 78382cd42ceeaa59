"""The evaluation harness: perplexity, memory, results JSON (speed in later modules)."""
