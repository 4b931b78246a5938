"""The copy-paste recipe through `ray job submit` against a `ray start --head` on loopback:
jobs/compose.py, then jobs/harmonize.py on its manifest, then jobs/export.py."""

from __future__ import annotations

from pathlib import Path

from pycocotools.coco import COCO
from ray_head import local_head
from test_compose import write_inputs


def test_compose_run_export_as_ray_jobs(tmp_path: Path) -> None:
    objects, backgrounds = write_inputs(str(tmp_path / "inputs"), {}, backgrounds=2)
    composed, harmonized = tmp_path / "composed", tmp_path / "harmonized"
    coco = tmp_path / "train" / "instances.json"
    jobs = [
        ("compose", ["--objects", objects, "--backgrounds", backgrounds, "-o", str(composed),
                     "--per-background", "2", "--max-objects", "2", "--no-progress"],
         "4 composites, 4 ok, 0 error"),
        ("harmonize", ["--manifest", str(composed / "manifest"), "--output", str(harmonized),
                       "--resolution", "64", "--no-progress"], "4 samples, 4 ok, 0 error"),
        ("export", ["--results", str(harmonized), "--where", "bg_psnr > 35", "--out", str(coco)],
         "selected 4 of 4 samples where bg_psnr > 35; exported 4 images"),
    ]  # fmt: skip
    with local_head(tmp_path) as head:
        for name, arguments, expected in jobs:
            printed = head.submit(f"jobs/{name}.py", arguments, timeout=300)
            assert expected in printed, printed[-4000:]
    dataset = COCO(str(coco))
    assert len(dataset.getImgIds()) == 4 and dataset.getAnnIds()
    for image in dataset.loadImgs(dataset.getImgIds()):
        assert image["file_name"].startswith(str(harmonized / "images"))
        assert Path(image["file_name"]).is_file()
