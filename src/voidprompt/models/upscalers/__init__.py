"""Model upscalers (ESRGAN-family RRDBNet files), A1111's tiled run, and the upscaler names."""
