from __future__ import annotations

from voidprompt.prompts.extra_networks import ExtraNetworkCall, extract_extra_networks


def test_extracts_tags_and_leaves_the_rest() -> None:
    text, calls = extract_extra_networks("a <lora:foo:0.8>, b <hypernet:bar:0.5>")
    assert text == "a , b "
    assert calls == [
        ExtraNetworkCall("lora", "foo", ("0.8",), {}, ("foo", "0.8")),
        ExtraNetworkCall("hypernet", "bar", ("0.5",), {}, ("bar", "0.5")),
    ]


def test_named_and_positional_arguments() -> None:
    _, calls = extract_extra_networks("<lora:foo:te=1:unet=0.5:dyn=8>")
    assert calls[0].name == "foo"
    assert calls[0].args == ()
    assert calls[0].named == {"te": "1", "unet": "0.5", "dyn": "8"}
    _, calls = extract_extra_networks("<lora:foo:0.7:0.3:a=b=c>")
    # Three parts on "=" is not a named argument.
    assert calls[0].positional == ("foo", "0.7", "0.3", "a=b=c")
    assert calls[0].named == {}


def test_not_tags() -> None:
    for text in ["<lora:>", "<no colon>", "<lo-ra:x>", "a < b > c"]:
        assert extract_extra_networks(text) == (text, [])


def test_args_stop_at_first_closing_angle() -> None:
    text, calls = extract_extra_networks("<lora:a:1>>")
    assert text == ">"
    assert calls[0].items == ("a", "1")
