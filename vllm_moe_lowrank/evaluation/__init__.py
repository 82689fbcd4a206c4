"""``moe-eval``: measure what a dense or compressed checkpoint really serves (perplexity, layer errors)."""
