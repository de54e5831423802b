"""A1111's X/Y/Z plot over the API, against a real server on the tiny checkpoint (64 px, 1-2 steps).

Requests are in A1111 1.10's layout: ``script_name`` and 18 positional ``script_args``. webuiapi
0.9.17 has no X/Y/Z helper; its ``txt2img(script_name=..., script_args=...)`` sends them as is.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image

from voidprompt.imagemeta import read_infotext
from voidprompt.infotext import parse_generation_parameters

webuiapi = pytest.importorskip("webuiapi")

SMALL = dict(prompt="a red ball", negative_prompt="blurry", seed=1234, steps=1, width=64, height=64)


def script_args(**changes: Any) -> list[Any]:
    values: dict[str, Any] = dict(
        x_type=0, x_values="", x_values_dropdown=[], y_type=0, y_values="", y_values_dropdown=[],
        z_type=0, z_values="", z_values_dropdown=[], draw_legend=True, include_lone_images=False,
        include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False, vary_seeds_y=False,
        vary_seeds_z=False, margin_size=0, csv_mode=False,
    )  # fmt: skip
    values.update(changes)
    return list(values.values())


def post(server: Any, kind: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        return http.post(f"/sdapi/v1/{kind}", json=body)


def images_of(response: httpx.Response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in response.json()["images"]]


def params(text: str) -> dict[str, Any]:
    return {k: str(v) for k, v in parse_generation_parameters(text).items()}


def test_scripts_lists_the_plot_for_both_tabs(server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/sdapi/v1/scripts").json() == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot"]}
        info = http.get("/sdapi/v1/script-info").json()
    assert [(i["name"], i["is_img2img"], i["is_alwayson"]) for i in info] == [
        ("x/y/z plot", False, False),
        ("x/y/z plot", True, False),
    ]
    txt2img, img2img = (entry["args"] for entry in info)
    # The 18 arguments as A1111 1.10's UI declares them, in script_args order.
    assert [a["label"] for a in txt2img] == [
        "X type", "X values", "X values", "Y type", "Y values", "Y values", "Z type", "Z values", "Z values",
        "Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
        "Vary seeds for Y", "Vary seeds for Z", "Grid margins (px)", "Use text inputs instead of dropdowns",
    ]  # fmt: skip
    assert [txt2img[0]["value"], txt2img[3]["value"], txt2img[9]["value"]] == ["Seed", "Nothing", True]
    assert (len(txt2img[0]["choices"]), len(img2img[0]["choices"])) == (42, 41)
    assert (txt2img[0]["choices"][24], img2img[0]["choices"][24]) == ("Clip skip", "Denoising")
    assert (txt2img[16]["minimum"], txt2img[16]["maximum"], txt2img[16]["step"]) == (0, 500, 2)


def test_webuiapi_plot_of_steps_by_cfg(server) -> None:  # type: ignore[no-untyped-def]
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=1)
    args = script_args(x_type=4, x_values="1-2", y_type=6, y_values="3, 7", include_lone_images=True)
    result = api.txt2img(
        **SMALL, sampler_name="Euler", cfg_scale=5, script_name="X/Y/Z plot", script_args=args
    )
    grid, cells = result.images[0], result.images[1:]
    assert len(cells) == 4 and all(cell.size == (64, 64) for cell in cells)
    info = result.info
    assert info["index_of_first_image"] == 1
    assert info["all_seeds"] == [1234] * 4
    # Cells in A1111's image order: x fastest. Each is the first image of a plain call with its values.
    wanted = [("1", "3.0"), ("2", "3.0"), ("1", "7.0"), ("2", "7.0")]
    for cell, text, (steps, cfg) in zip(cells, info["infotexts"][1:], wanted, strict=True):
        cell_params = params(text)
        assert (cell_params["Steps"], cell_params["CFG scale"]) == (steps, cfg.removesuffix(".0"))
        assert "Script" not in cell_params
        assert read_infotext(cell)[0] == text
    plain = api.txt2img(**{**SMALL, "steps": 2}, sampler_name="Euler", cfg_scale=7)
    assert plain.image.tobytes() == cells[3].tobytes()
    # The grid's own infotext: the first cell's, plus A1111's script keys; the PNG carries it too.
    grid_params = params(info["infotexts"][0])
    assert grid_params["Script"] == "X/Y/Z plot"
    assert (grid_params["X Type"], grid_params["X Values"]) == ("Steps", "1-2")
    assert (grid_params["Y Type"], grid_params["Y Values"]) == ("CFG Scale", "3, 7")
    assert "Z Type" not in grid_params and "Fixed X Values" not in grid_params
    assert (grid_params["Steps"], grid_params["CFG scale"]) == ("1", "3")
    assert read_infotext(grid)[0] == info["infotexts"][0]
    # A1111's layout: row labels take 3/4 of a cell's width; the cells are pasted unchanged.
    pad_left = 64 * 3 // 4
    assert grid.width == pad_left + 2 * 64
    pad_top = grid.height - 2 * 64
    assert pad_top > 0
    for i, cell in enumerate(cells):
        left, top = pad_left + 64 * (i % 2), pad_top + 64 * (i // 2)
        assert (
            grid.convert("RGB").crop((left, top, left + 64, top + 64)).tobytes()
            == cell.convert("RGB").tobytes()
        )


@pytest.mark.parametrize(
    ("lone", "sub", "count"), [(False, False, 1), (False, True, 3), (True, False, 5), (True, True, 7)]
)
def test_answer_holds_sub_grids_and_cells_when_asked(server, lone: bool, sub: bool, count: int) -> None:  # type: ignore[no-untyped-def]
    args = script_args(
        x_type=1, x_values="1, 2", z_type=6, z_values="3,7", include_lone_images=lone, include_sub_grids=sub
    )
    response = post(server, "txt2img", {**SMALL, "script_name": "x/y/z plot", "script_args": args})
    assert response.status_code == 200, response.text
    images = images_of(response)
    info = json.loads(response.json()["info"])
    assert len(images) == count
    # The main grid: the two sub-grids side by side (no row labels: Y is Nothing).
    assert images[0].width == 2 * 128
    main = params(info["infotexts"][0])
    assert (main["X Type"], main["Fixed X Values"], main["Z Type"], main["Z Values"]) == (
        "Seed",
        "1, 2",
        "CFG Scale",
        "3,7",
    )
    # A1111's lists: the main grid's infotext, the sub-grids' (when kept), then every cell's; the
    # prompt and seed lists never held the main grid.
    nz, cells = 2, 4
    assert len(info["infotexts"]) == 1 + (nz if sub else 0) + cells
    assert info["all_seeds"] == ([1, 1] if sub else []) + [1, 2, 1, 2]
    if sub:
        first_sub = params(info["infotexts"][1])
        assert first_sub["X Type"] == "Seed" and "Z Type" not in first_sub
        assert [im.size for im in images[1:3]] == [(128, images[1].height)] * 2
    if lone:
        lone_images = images[-4:]
        assert all(im.size == (64, 64) for im in lone_images)
        assert [params(read_infotext(im)[0])["Seed"] for im in lone_images] == ["1", "2", "1", "2"]


def test_img2img_axis_indices_are_its_own(server) -> None:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    # Index 24 is Denoising on img2img's list (Clip skip on txt2img's).
    body = {**SMALL, "steps": 2, "init_images": [init], "script_name": "X/Y/Z plot",
            "script_args": script_args(x_type=24, x_values="0.5, 1", include_lone_images=True)}  # fmt: skip
    response = post(server, "img2img", body)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert params(info["infotexts"][0])["X Type"] == "Denoising"
    assert [params(t)["Denoising strength"] for t in info["infotexts"][1:]] == ["0.5", "1.0"]
    txt = post(
        server,
        "txt2img",
        {**SMALL, "script_name": "X/Y/Z plot", "script_args": script_args(x_type=24, x_values="1, 2")},
    )
    assert params(json.loads(txt.json()["info"])["infotexts"][0])["X Type"] == "Clip skip"


def test_choice_axis_reads_the_dropdown_or_the_text_in_csv_mode(server) -> None:  # type: ignore[no-untyped-def]
    dropdown = script_args(
        x_type=9, x_values="Heun", x_values_dropdown=["Euler", "DDIM"], include_lone_images=True
    )
    response = post(server, "txt2img", {**SMALL, "script_name": "X/Y/Z plot", "script_args": dropdown})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert [params(t)["Sampler"] for t in info["infotexts"][1:]] == ["Euler", "DDIM"]
    assert params(info["infotexts"][0])["X Values"] == "Euler,DDIM"
    typed = script_args(x_type=9, x_values="Euler a, Heun", x_values_dropdown=["DDIM"], csv_mode=True,
                        include_lone_images=True)  # fmt: skip
    info = json.loads(
        post(server, "txt2img", {**SMALL, "script_name": "X/Y/Z plot", "script_args": typed}).json()["info"]
    )
    assert [params(t)["Sampler"] for t in info["infotexts"][1:]] == ["Euler a", "Heun"]
    empty = script_args(x_type=9, x_values="Euler a, Heun")
    refused = post(server, "txt2img", {**SMALL, "script_name": "X/Y/Z plot", "script_args": empty})
    assert refused.status_code == 422
    assert "x_values_dropdown" in refused.json()["detail"]


def test_prompt_search_and_replace(server) -> None:  # type: ignore[no-untyped-def]
    args = script_args(x_type=7, x_values="red, blue", include_lone_images=True)
    info = json.loads(
        post(server, "txt2img", {**SMALL, "script_name": "X/Y/Z plot", "script_args": args}).json()["info"]
    )
    assert [parse_generation_parameters(t)["Prompt"] for t in info["infotexts"][1:]] == [
        "a red ball",
        "a blue ball",
    ]


# The first X/Y/Z plot's 11 arguments: no dropdowns, no vary_seeds, no csv_mode.
OLD_LAYOUT = [4, "1,2", 0, "", 0, "", True, False, False, False, 0]


@pytest.mark.parametrize(
    ("kind", "args", "expected"),
    [
        ("txt2img", OLD_LAYOUT, "older A1111 layout (x_type, x_values, y_type"),
        ("txt2img", script_args()[:17], "got 17 script_args"),
        ("txt2img", script_args(x_type=32, x_values="true"), "'Face restore' cannot run here"),
        ("img2img", script_args(y_type=6, y_values="1.5"), "'Image CFG Scale' cannot run here"),
        ("txt2img", script_args(x_type=42, x_values="1"), "not an axis index of txt2img"),
    ],
)  # fmt: skip
def test_unrunnable_plots_get_422_naming_the_problem(
    server, kind: str, args: list[Any], expected: str
) -> None:  # type: ignore[no-untyped-def]
    body: dict[str, Any] = {**SMALL, "script_name": "X/Y/Z plot", "script_args": args}
    if kind == "img2img":
        body["init_images"] = [base64.b64encode(_png()).decode()]
    response = post(server, kind, body)
    assert response.status_code == 422
    payload = response.json()
    assert expected in payload["detail"]
    assert set(payload) == {"error", "detail", "body", "errors"}


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()
