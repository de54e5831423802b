"""The HTTP routes, one module per API surface; each module's ``router(state)`` builds its routes
over the server's state, and :func:`voidprompt.server.api.create_app` includes them in this order:

- ``sdapi_generation``: A1111's txt2img, img2img, png-info, progress, interrupt, skip;
- ``sdapi_extras``: A1111's extras (model and pixel upscalers over one picture or a batch);
- ``sdapi_interrogate``: A1111's interrogate (DeepDanbooru and WD14 taggers);
- ``sdapi_models``: A1111's options, cmd-flags, samplers, schedulers, upscalers, checkpoints, VAEs;
- ``sdapi_networks``: A1111's embeddings, LoRAs, hypernetworks;
- ``sdapi_system``: A1111's styles, restorers, scripts, extensions (empty here) and memory;
- ``voidprompt_generation``: voidprompt's own txt2img and img2img, A1111's with ``explain``;
- ``voidprompt_tokens`` and ``voidprompt_studies``: voidprompt's own routes for its web page and
  studies;
- ``voidprompt_explain``: explanations of generations and of study images, and their pictures.
"""

SDAPI = "/sdapi/v1"
VOIDPROMPT = "/voidprompt/v1"
