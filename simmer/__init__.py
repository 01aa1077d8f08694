"""simmer's shared contract: the tokenizer and the model bundle format.

Everything here is importable without torch, so the serving image can use it.
"""
