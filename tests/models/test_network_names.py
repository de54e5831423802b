"""Network names resolve only through the configured folder's list: no traversal, no absolute paths,
no links out of the folder, and one message whether or not a file exists where a name points."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from voidprompt.errors import ModelLoadError
from voidprompt.models.load import load_model
from voidprompt.models.networks import NetworkManager
from voidprompt.models.networks.names import HYPERNETWORK, LORA, NetworkList, scan_network_folder
from voidprompt.prompts.extra_networks import extract_extra_networks
from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"


class _Tok:
    pass


@pytest.fixture(scope="module")
def comps(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return load_model(
        write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors"), tokenizer=_Tok()
    )


def _lora(path: Path, alias: str | None = None) -> Path:
    """A one-layer LoRA that the tiny model accepts (its to_q is 32x32 there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{LAYER}.lora_up.weight": torch.full((32, 1), 0.5),
        f"{LAYER}.lora_down.weight": torch.full((1, 32), 0.25),
        f"{LAYER}.alpha": torch.tensor(1.0),
    }
    save_file(tensors, str(path), metadata={"ss_output_name": alias} if alias else None)
    return path


def _error(comps, tag: str, **folders: Path | None) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError) as err:
        NetworkManager().apply(
            comps,
            extract_extra_networks(tag)[1],
            lora_dir=folders.get("lora_dir"),
            hypernet_dir=folders.get("hypernet_dir"),
            missing="error",
        )
    return str(err.value)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """models/Lora with one LoRA; a valid LoRA and a hypernetwork-named file outside it."""
    lora = tmp_path / "models" / "Lora"
    hyper = tmp_path / "models" / "hypernetworks"
    hyper.mkdir(parents=True)
    _lora(lora / "inside.safetensors")
    outside = _lora(tmp_path / "secret.safetensors")
    (tmp_path / "secret.pt").write_bytes(b"not a hypernetwork")
    return {"root": tmp_path, "lora": lora, "hyper": hyper, "outside": outside}


@pytest.mark.parametrize(
    ("existing", "missing"),
    [
        ("../../secret", "../../nothing"),  # traversal
        ("<abs>/secret", "<abs>/nothing"),  # absolute path (the suffix is added by the old lookup)
        ("../Lora/../../secret", "../Lora/../../nothing"),
    ],
)
def test_a_path_as_a_lora_name_is_unknown_with_the_same_message(comps, tree, existing, missing) -> None:  # type: ignore[no-untyped-def]
    root = str(tree["root"])
    existing, missing = existing.replace("<abs>", root), missing.replace("<abs>", root)
    assert (tree["lora"] / f"{existing}.safetensors").resolve().is_file()  # the file is really there
    found = _error(comps, f"<lora:{existing}:1>", lora_dir=tree["lora"])
    absent = _error(comps, f"<lora:{missing}:1>", lora_dir=tree["lora"])
    assert found.startswith(f"unknown network '{existing}': no LoRA of that name in {tree['lora']}")
    assert found.replace(existing, "NAME") == absent.replace(missing, "NAME")
    assert "available: inside." in found


def test_a_path_as_a_hypernetwork_name_is_unknown_with_the_same_message(comps, tree) -> None:  # type: ignore[no-untyped-def]
    existing, missing = str(tree["root"] / "secret"), str(tree["root"] / "nothing")
    found = _error(comps, f"<hypernet:{existing}:1>", hypernet_dir=tree["hyper"])
    absent = _error(comps, f"<hypernet:{missing}:1>", hypernet_dir=tree["hyper"])
    assert found.startswith(f"unknown network '{existing}': no hypernetwork of that name")
    assert found.replace(existing, "NAME") == absent.replace(missing, "NAME")


def test_by_default_a_path_name_is_skipped_and_nothing_is_loaded(comps, tree) -> None:  # type: ignore[no-untyped-def]
    weight = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight
    before = weight.detach().clone()
    name = str(tree["outside"].with_suffix(""))
    manager = NetworkManager()
    applied = manager.apply(
        comps, extract_extra_networks(f"<lora:{name}:1>")[1], lora_dir=tree["lora"], hypernet_dir=None
    )
    assert applied.loras == [] and applied.notes == [f"Networks not found: {name}"]
    assert torch.equal(weight.detach(), before)
    # The folder's own LoRA under its name does load: 0.5 * 0.25 added to every element.
    applied = manager.apply(
        comps, extract_extra_networks("<lora:inside:1>")[1], lora_dir=tree["lora"], hypernet_dir=None
    )
    assert [a.name for a in applied.loras] == ["inside"]
    assert torch.equal(weight.detach(), before + 0.125)
    manager.restore()
    assert torch.equal(weight.detach(), before)


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_links_out_of_the_folder_are_not_listed_links_inside_are(comps, tree) -> None:  # type: ignore[no-untyped-def]
    lora = tree["lora"]
    (lora / "escape.safetensors").symlink_to(tree["outside"])
    (lora / "again.safetensors").symlink_to(lora / "inside.safetensors")
    (lora / "linkdir").symlink_to(tree["root"], target_is_directory=True)  # not descended
    assert scan_network_folder(lora, LORA.suffixes) == {
        "again": lora / "again.safetensors",
        "inside": lora / "inside.safetensors",
    }
    message = _error(comps, "<lora:escape:1>", lora_dir=lora)
    assert message.startswith("unknown network 'escape'")
    assert message.replace("escape", "NAME") == _error(comps, "<lora:nowhere:1>", lora_dir=lora).replace(
        "nowhere", "NAME"
    )
    # The configured folder may itself be a link: it is resolved before comparing.
    linked = tree["root"] / "linked-folder"
    linked.symlink_to(lora, target_is_directory=True)
    assert set(scan_network_folder(linked, LORA.suffixes)) == {"again", "inside"}


def test_aliases_follow_a1111(tmp_path: Path) -> None:
    lora = tmp_path / "Lora"
    _lora(lora / "sub" / "fancy.safetensors", alias="Fancy Alias")
    _lora(lora / "plain.safetensors", alias="plain")
    _lora(lora / "shadow.safetensors", alias="plain")  # alias equal to another file's name
    _lora(lora / "twin1.safetensors", alias="Twin")
    _lora(lora / "twin2.safetensors", alias="Twin")  # one alias for two files
    _lora(lora / "odd.safetensors", alias="None")  # A1111 always forbids "none"
    listing = NetworkList.scan(LORA, lora)
    assert listing.find("fancy") == lora / "sub" / "fancy.safetensors"
    assert listing.find("Fancy Alias") == lora / "sub" / "fancy.safetensors"
    assert listing.find("fancy alias") is None  # exact case, as a dict lookup
    assert listing.find("plain") == lora / "plain.safetensors"  # a file name beats an alias
    assert listing.find("Twin") is None and listing.find("twin1") == lora / "twin1.safetensors"
    assert listing.find("None") is None
    assert listing.find("sub/fancy") is None


def test_names_in_subfolders_and_duplicates(tmp_path: Path) -> None:
    lora = tmp_path / "Lora"
    _lora(lora / "a" / "deep.safetensors")
    _lora(lora / "style.safetensors")
    _lora(lora / "b" / "style.safetensors")  # the folder's own file wins
    (lora / "c").mkdir()
    (lora / "c" / "style.ckpt").write_bytes(b"x")
    listing = NetworkList.scan(LORA, lora)
    assert listing.files == {"deep": lora / "a" / "deep.safetensors", "style": lora / "style.safetensors"}


def test_a_hypernetwork_named_none_is_not_listed(tmp_path: Path) -> None:
    (tmp_path / "None.pt").write_bytes(b"x")
    (tmp_path / "h.pt").write_bytes(b"x")
    assert NetworkList.scan(HYPERNETWORK, tmp_path).files == {"h": tmp_path / "h.pt"}


def test_a_file_added_or_removed_after_a_scan_is_found_on_the_next_lookup(comps, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manager = NetworkManager()
    lora = tmp_path / "Lora"
    lora.mkdir()
    applied = manager.apply(
        comps, extract_extra_networks("<lora:late:1>")[1], lora_dir=lora, hypernet_dir=None
    )
    assert applied.notes == ["Networks not found: late"]
    _lora(lora / "sub" / "late.safetensors")
    applied = manager.apply(
        comps, extract_extra_networks("<lora:late:1>")[1], lora_dir=lora, hypernet_dir=None
    )
    assert [a.name for a in applied.loras] == ["late"]
    (lora / "sub" / "late.safetensors").rename(lora / "late.safetensors")
    applied = manager.apply(
        comps, extract_extra_networks("<lora:late:0.5>")[1], lora_dir=lora, hypernet_dir=None
    )
    assert [(a.name, a.unet) for a in applied.loras] == [("late", 0.5)]
    manager.restore()


def test_the_manager_finds_a_lora_by_its_alias(comps, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lora = tmp_path / "Lora"
    _lora(lora / "sub" / "file_name.safetensors", alias="ShownName")
    manager = NetworkManager()
    for tag in ("<lora:ShownName:1>", "<lora:file_name:1>"):
        applied = manager.apply(comps, extract_extra_networks(tag)[1], lora_dir=lora, hypernet_dir=None)
        assert len(applied.loras) == 1 and applied.notes == []
    assert _error(comps, "<lora:sub/file_name:1>", lora_dir=lora).startswith(
        "unknown network 'sub/file_name'"
    )
    manager.restore()
