"""Image taggers: A1111's DeepDanbooru (a torch ResNet read through the restricted unpickler) and
WD14-style ONNX taggers (onnxruntime, the ``taggers`` extra). Both answer with one
:class:`~voidprompt.models.taggers.result.TagResult`."""
