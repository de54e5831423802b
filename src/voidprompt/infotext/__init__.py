"""A1111 infotext ("parameters" text), one module per job.

* :mod:`~voidprompt.infotext.write`: one image's parameters and the text they make;
* :mod:`~voidprompt.infotext.parse`: the text read back into A1111's dict, defaults filled in;
* :mod:`~voidprompt.infotext.versions`: A1111's "Version" reading and the compatibility switches
  it turns on;
* :mod:`~voidprompt.infotext.to_request`: the parsed dict as GenerationRequest fields.
"""

from voidprompt.infotext.parse import (
    old_hires_fix_first_pass_dimensions,
    parse_generation_parameters,
    prompt_uses_emphasis,
    unquote,
)
from voidprompt.infotext.to_request import request_fields_from_infotext, request_fields_from_params
from voidprompt.infotext.versions import (
    DEFAULT_VERSION,
    Version,
    backcompat_flags,
    check_written_version,
    parse_version,
)
from voidprompt.infotext.write import (
    KEY_ORDER,
    TRAILING_KEYS,
    ImageFacts,
    ModelFacts,
    PassFacts,
    RunFacts,
    create_infotext,
    emphasis_written,
    eta_key,
    format_params_line,
    generation_params,
    quote,
    ti_hashes_text,
)

__all__ = [
    "DEFAULT_VERSION",
    "KEY_ORDER",
    "TRAILING_KEYS",
    "ImageFacts",
    "ModelFacts",
    "PassFacts",
    "RunFacts",
    "Version",
    "backcompat_flags",
    "check_written_version",
    "create_infotext",
    "emphasis_written",
    "eta_key",
    "format_params_line",
    "generation_params",
    "old_hires_fix_first_pass_dimensions",
    "parse_generation_parameters",
    "parse_version",
    "prompt_uses_emphasis",
    "quote",
    "request_fields_from_infotext",
    "request_fields_from_params",
    "ti_hashes_text",
    "unquote",
]
