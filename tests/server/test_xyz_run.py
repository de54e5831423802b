"""Running a planned X/Y/Z plot as one queue job, with a stand-in model host: progress across cells,
an interrupt between cells, a failing cell - each answered as A1111's draw_xyz_grid does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from voidprompt.errors import NansError
from voidprompt.pipeline.result import Result
from voidprompt.server.checkpoints import CheckpointEntry, ModelRegistry
from voidprompt.server.generation import BuiltRequest, Generated, Options
from voidprompt.server.limits import Limits
from voidprompt.server.models import Txt2ImgRequest
from voidprompt.server.queue import State
from voidprompt.server.xyz import PlotPlan, plan_plot, plot_answer, run_plot, script_args

pytest.importorskip("fastapi")

COLORS = {1: (250, 0, 0), 2: (0, 250, 0), 3: (0, 0, 250)}


class FakeHost:
    """Answers each cell with a 16x16 picture coloured by its steps; can interrupt or fail."""

    def __init__(
        self, checkpoint: CheckpointEntry, *, interrupt_at: int = -1, fail_steps: frozenset[int] = frozenset()
    ) -> None:
        self.state = State()
        self.checkpoint = checkpoint
        self.interrupt_at = interrupt_at
        self.fail_steps = fail_steps
        self.calls: list[tuple[int | None, int, str]] = []

    def generate(self, job: str, built: BuiltRequest, *, first_iteration: int | None = None) -> Generated:
        request = built.request
        with self.state.lock:
            self.calls.append((first_iteration, self.state.job_count, self.state.job))
            if len(self.calls) - 1 == self.interrupt_at:
                self.state.interrupted = True
        if request.steps in self.fail_steps:
            raise NansError("A tensor with NaNs was produced in Unet.")
        image = Image.new("RGB", (16, 16), COLORS[request.steps])
        text = f"cell\nSteps: {request.steps}, Seed: {request.seed}"
        result = Result(
            [image], [text], [request.seed], [request.subseed], ["cell"], [""],
            [{"Steps": request.steps, "Seed": request.seed}], request=request,
        )  # fmt: skip
        return Generated(result, request, self.checkpoint, None, "20260101000000", False)


@pytest.fixture()
def checkpoint(tmp_path: Path) -> CheckpointEntry:
    path = tmp_path / "fake.safetensors"
    path.write_bytes(b"not a model: only its hash is read")
    return CheckpointEntry(path, path.name)


def three_steps(tmp_path: Path, **changes: Any) -> PlotPlan:
    values: dict[str, Any] = dict(
        x_type=4, x_values="1, 2, 3", draw_legend=False, include_lone_images=True, **changes
    )
    body = Txt2ImgRequest(
        prompt="cell", seed=9, width=16, height=16, script_name="x/y/z plot",
        script_args=script_args(**values),
    )  # fmt: skip
    registry = ModelRegistry([tmp_path], [], [tmp_path])
    return plan_plot(body, Options(), Limits(), registry)


def colors(image: Image.Image) -> list[tuple[int, int, int]]:
    return [image.getpixel((x, 8)) for x in range(8, image.width, 16)]


def test_cells_share_one_job_and_its_progress(tmp_path: Path, checkpoint: CheckpointEntry) -> None:
    host = FakeHost(checkpoint)
    result = run_plot(host, "txt2img", three_steps(tmp_path))  # type: ignore[arg-type]
    assert host.calls == [(0, 3, "1 out of 3"), (1, 3, "2 out of 3"), (2, 3, "3 out of 3")]
    assert host.state.job_count == 0  # the job ended with the plot
    answer = plot_answer(result)
    assert colors(answer.images[0]) == [COLORS[1], COLORS[2], COLORS[3]]  # no legend: cells side by side
    assert answer.info["interrupted"] is False
    assert answer.info["all_seeds"] == [9, 9, 9]


def test_an_interrupt_leaves_the_later_cells_black(tmp_path: Path, checkpoint: CheckpointEntry) -> None:
    host = FakeHost(checkpoint, interrupt_at=1)
    answer = plot_answer(run_plot(host, "txt2img", three_steps(tmp_path)))  # type: ignore[arg-type]
    assert len(host.calls) == 2
    assert colors(answer.images[0]) == [COLORS[1], COLORS[2], (0, 0, 0)]
    assert answer.info["interrupted"] is True
    # The lone images: the black cell has no infotext, as A1111's list holds None for it.
    assert answer.images[3].getcolors() == [(256, (0, 0, 0))]
    assert answer.infotexts[3] is None and answer.info["all_seeds"] == [9, 9, None]


def test_a_failed_cell_is_black_and_a_plot_with_no_picture_fails(
    tmp_path: Path, checkpoint: CheckpointEntry
) -> None:
    answer = plot_answer(
        run_plot(FakeHost(checkpoint, fail_steps=frozenset({2})), "txt2img", three_steps(tmp_path))
    )  # type: ignore[arg-type]
    assert colors(answer.images[0]) == [COLORS[1], (0, 0, 0), COLORS[3]]
    assert answer.info["interrupted"] is False
    with pytest.raises(NansError, match="NaNs"):
        run_plot(FakeHost(checkpoint, fail_steps=frozenset({1, 2, 3})), "txt2img", three_steps(tmp_path))  # type: ignore[arg-type]
