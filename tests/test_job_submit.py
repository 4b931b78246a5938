"""The real thing: `ray start --head` on loopback (`ray_head.py`), `ray job submit` of
jobs/harmonize.py: a forward run, and DiffHarmony++'s inverse harmonization with the harmony
classifier."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
from ray_head import local_head
from tiny_checkpoint import write_harmony_classifier, write_tiny_model_dir


def test_ray_job_submit_against_local_head(demo_manifest: str, tmp_path: Path) -> None:
    output = tmp_path / "out"
    generated = tmp_path / "generated"
    # DiffHarmony++ in the release's formats: the inverse model, the pickled classifier.
    inverse_dir = write_tiny_model_dir(tmp_path / "inverse", harmony_vae=True, direction="inverse")
    classifier = write_harmony_classifier(tmp_path / "harmony_classifier")
    with local_head(tmp_path) as head:
        printed = head.submit(
            "jobs/harmonize.py",
            ["--manifest", demo_manifest, "--output", str(output), "--resolution", "128",
             "--no-progress", "--run-id", "submitted"],
            timeout=420,
        )  # fmt: skip
        assert "8 samples, 8 ok, 0 error" in printed
        # Through the same entry point: inverse harmonization, two variants per real image.
        inverse = head.submit(
            "jobs/harmonize.py",
            ["--manifest", demo_manifest, "--output", str(generated), "--model", "diffharmony",
             "--model-dir", str(inverse_dir), "--direction", "inverse", "--variants", "2",
             "--classifier", str(classifier), "--allow-unsafe-pickle", "--resolution", "64",
             "--steps", "2", "--no-progress", "--run-id", "inverse"],
            timeout=420,
        )  # fmt: skip
        assert "16 samples, 16 ok, 0 error" in inverse
        assert "harmony classifier: mean unharmony_prob" in inverse
    results = pads.dataset(str(output / "results" / "submitted")).to_table()
    assert results.num_rows == 8 and set(results["status"].to_pylist()) == {"ok"}
    for uri in results["output_uri"].to_pylist():
        assert Path(uri).is_file()
    rows = pads.dataset(str(generated / "results" / "inverse")).to_table().to_pylist()
    assert sorted(r["sample_id"] for r in rows) == sorted(
        f"{r['source_sample_id']}__v{k}" for r in rows if r["variant"] == 0 for k in (0, 1)
    )
    assert all(Path(r["output_uri"]).name == f"{r['sample_id']}.png" for r in rows)
    assert all(r["unharmony_prob"] is not None and r["direction"] == "inverse" for r in rows)
