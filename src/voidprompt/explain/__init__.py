"""Show how the numbers work: what the UNet attends to per prompt tag, how the positive and negative
predictions pull apart, and how the picture forms step by step.

The capture watches the CFG denoiser and the UNet's cross-attention without changing either (the
pictures are bit-identical with it on); :mod:`voidprompt.explain.recorder` gathers one
:class:`~voidprompt.explain.record.Explanation` per image, :mod:`voidprompt.explain.store` writes it
beside the picture, :mod:`voidprompt.explain.measures` turns it into numbers a report can plot.
"""
