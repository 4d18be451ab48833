"""Media preprocessing: images (the family's image processor) and videos (decoding, frame sampling, patches)."""
