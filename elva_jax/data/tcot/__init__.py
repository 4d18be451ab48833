"""Embed-RL's evidence-traceable chain of thought (T-CoT): the parser of generated text and the prompt encoders."""
