"""The Ray executor on a local 2-CPU Ray cluster gives the same catalog as the local executor."""

from pathlib import Path

import numpy as np
import pytest
from lab_helpers import quiet, study_text
from PIL import Image

from voidprompt.lab.catalog import Catalog
from voidprompt.lab.run import run_study
from voidprompt.lab.study import parse_study

ray = pytest.importorskip("ray")

# Both runs pin torch to one thread per process, so float summation order is the same and the
# images agree exactly; the stated tolerance (1/255 per channel) only absorbs a BLAS that picks
# kernels by process.
TOLERANCE = 1


def _catalog(folder: Path) -> dict[str, tuple[np.ndarray, str, dict[str, float], str]]:
    out = {}
    with Catalog.open(folder / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        for image in catalog.images():
            with Image.open(folder / "runs" / "t" / image["path"]) as png:
                pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
            out[image["job_id"]] = (pixels, image["infotext"], catalog.measures(image["id"]), image["path"])
    return out


@pytest.mark.slow  # a Ray cluster of worker processes
def test_ray_matches_local(tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random")
    local = parse_study(text, tmp_path / "local" / "t.toml")
    distributed = parse_study(text, tmp_path / "ray" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_study(distributed, quiet(distributed, executor="ray", batch_size=2, threads=1))
        # A batch a worker's Engine rejects fails as a whole there too; the other batches go on.
        # The strength is the innermost axis: the first four jobs are two batches, one of each
        # strength, and a hires pass with strength 0 has no schedule (the Engine refuses it).
        hires_axis = text.replace("[settings]\n", "[settings]\nenable_hr = true\n").replace(
            "[labels]", 'denoising_strength = "0.5, 0"\n[labels]'
        )
        rejected = parse_study(hires_axis, tmp_path / "rejected" / "t.toml")
        partial = run_study(rejected, quiet(rejected, executor="ray", batch_size=2, threads=1, max_jobs=4))
    finally:
        ray.shutdown()
    assert (partial.generated, len(partial.failed)) == (2, 2)
    assert set(partial.failed.values()) == {next(iter(partial.failed.values()))}
    assert next(iter(partial.failed.values())).startswith("denoising_strength=0 with enable_hr")
    assert (report.generated, report.batches) == (8, 4)
    a, b = _catalog(tmp_path / "local"), _catalog(tmp_path / "ray")
    assert sorted(a) == sorted(b) == sorted(j.job_id for j in local.expand())
    for job_id, (pixels, infotext, measures, path) in a.items():
        other = b[job_id]
        assert int(np.abs(pixels - other[0]).max()) <= TOLERANCE
        assert infotext == other[1] and path == other[3]
        assert measures == pytest.approx(other[2], abs=2 / 255)


@pytest.mark.slow  # a Ray cluster of worker processes, one of them killed
def test_one_worker_per_gpu_and_a_killed_workers_batches_run_again(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """A local Ray that declares two GPUs places one worker on each (they compute on the CPU
    here: --device cpu); killing one worker's process while it holds batches sends those batches
    to its replacement, and every job comes back exactly once with the local executor's pixels."""
    import os
    import signal

    from voidprompt.lab.execution import LocalExecutor, Placement
    from voidprompt.lab.plugins import ModelFiles
    from voidprompt.lab.ray_executor import RayExecutor
    from voidprompt.lab.run import plan_batches

    # Slow enough batches (20 steps, 32x32) that the killed worker is still busy when it dies.
    text = study_text(tiny_checkpoint, sizes="32x32", seeds="4 random", steps=20)
    jobs = parse_study(text, tmp_path / "t.toml").expand()
    files = {jobs[0].model: ModelFiles(tiny_checkpoint, None)}
    batches = plan_batches(jobs, 2)
    assert len(batches) == 4
    local = LocalExecutor(files, threads=1)
    expected = {
        g.job_id: np.asarray(g.image, dtype=np.int16) for r in local.run(batches) for g in r.generated
    }

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        executor = RayExecutor(files, threads=1, placement=Placement("cpu"))
        assert (executor.gpus, executor.workers) == (1.0, 2)
        got: dict[str, list[np.ndarray]] = {}
        for result in executor.run(batches):
            assert result.error is None
            if not got:  # the first batch is back; each worker still holds one or two
                assert sorted(tuple(p["gpu_ids"]) for p in executor.placed) == [("0",), ("1",)]
                assert len({p["pid"] for p in executor.placed}) == 2
                assert {p["device"] for p in executor.placed} == {"cpu"}
                os.kill(executor.placed[1]["pid"], signal.SIGKILL)
            for generated in result.generated:
                got.setdefault(generated.job_id, []).append(np.asarray(generated.image, dtype=np.int16))
        assert executor.lost == 1
        executor.close()
    finally:
        ray.shutdown()
    assert sorted(got) == sorted(j.job_id for j in jobs) and all(len(v) == 1 for v in got.values())
    for job_id, (pixels,) in got.items():
        assert int(np.abs(pixels - expected[job_id]).max()) <= TOLERANCE
