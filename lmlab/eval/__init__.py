"""Evaluation tasks and metrics (perplexity, accuracy, ROUGE, distinct-n, LLM judge). Above infer."""
