"""Word-level language modeling with a DEQ-Transformer (WikiText-103, WikiText-2, PTB)."""
