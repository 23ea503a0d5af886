"""Action recognition: tubes of crops per track and the video models that classify them."""
