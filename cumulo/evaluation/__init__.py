"""Accuracy of a model as served: perplexity on offline English text, before and after format conversion."""
