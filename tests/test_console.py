"""The console a person reads: a header, one progress bar, the summary; Ray's logs in the run's
log file, real warnings and per-sample errors still on the console.

The demo runs as `make demo` does, in a process of its own with its output not a terminal, and
its whole output is checked: no line at WARNING or ERROR level, none of Ray's (`(raylet)`, the
core worker's C++ lines, its execution plan).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.console import FALSE_ALARM, LogFile, Progress, false_alarm_to_log, ray_logs_to
from pipeline.storage import resolve

REPO = Path(__file__).resolve().parent.parent
# What a healthy run must not print: a level, Ray's own prefixes, its C++ log lines, its plan.
NOISE = re.compile(
    r"\b(WARNING|ERROR|CRITICAL|Traceback)\b|\(raylet\)|core_worker|\[[\d\- :,]+ [EWI] \d+ \d+\]"
    r"|Execution plan|Started a local Ray|authentication token|Token authentication"
)
PROGRESS = re.compile(r"^progress: (\d+)/(\d+) samples, [\d.]+ images/s, ETA [\d:?]+, elapsed ")
# The line Ray 2.60 printed for every healthy run (bench/gpu-2026-11-27/run.log).
CORE_WORKER_LINE = (
    b"[2026-11-27 23:48:39,057 E 487 487] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(HarmonizeActor))' and ID: '58a8b0947ab9fc42a3e37a3201000000' has "
    b"constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    b"object store go out of scope or are lost, the actor restart will fail. See "
    b"https://github.com/ray-project/ray/issues/53727 for more details.\n"
)


def test_demo_console_is_header_progress_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    output = tmp_path / "demo_output"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--root", str(tmp_path / "demo_data"),
         "--output", str(output)],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    shown = done.stdout + done.stderr
    print(shown)  # shown when a check fails
    assert done.returncode == 0, shown[-3000:]
    lines = shown.splitlines()

    header = done.stdout.splitlines()[0]
    assert header.startswith("harmonize run ") and " 8 samples of " in header, header
    log_path = Path(header.rsplit("; log: ", 1)[1])
    assert log_path.parent == output / "logs" and log_path.is_file()

    progress = [PROGRESS.match(line) for line in done.stderr.splitlines()]
    assert progress and all(progress), done.stderr  # stderr holds the progress lines only
    assert [int(m.group(2)) for m in progress] == [8] * len(progress)
    assert int(progress[-1].group(1)) == 8

    assert "8 samples, 8 ok, 0 error" in done.stdout
    assert any(line.startswith("images:  ") for line in lines)
    assert any(line.startswith("results: ") for line in lines)
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, noisy
    assert len(lines) <= 12, lines

    # Ray's INFO went to the run's log instead.
    logged = log_path.read_text()
    assert "Started a local Ray instance" in logged and "Execution plan" in logged


def test_a_bad_sample_is_one_clear_line(
    ray_cluster: None, demo_manifest: str, tmp_path: Path
) -> None:
    """A real problem in a run stays visible: the sample's error, once, in one line."""
    table = pq.read_table(demo_manifest)
    base = str(Path(demo_manifest).parent)
    rows = [  # the demo's URIs are relative to its manifest: made absolute for the copy
        {k: resolve(base, v) if k.endswith("_uri") and v else v for k, v in row.items()}
        for row in table.to_pylist()
    ]
    rows.append({**rows[0], "sample_id": "lost", "mask_uri": str(tmp_path / "gone.png")})
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows, table.schema), manifest)

    result = CliRunner().invoke(
        app, ["run", "-m", str(manifest), "-o", str(tmp_path / "out"), "--resolution", "64"]
    )
    print(result.output)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("harmonize run ") and " 9 samples of " in lines[0]
    assert "9 samples, 8 ok, 1 error" in result.output
    about = [line for line in lines if "lost" in line]
    assert len(about) == 1 and about[0].startswith("error: sample 'lost': "), about
    assert any(PROGRESS.match(line) for line in lines)
    assert not [line for line in lines if NOISE.search(line)]


def test_warnings_stay_on_the_console_info_goes_to_the_log(tmp_path: Path) -> None:
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    root.addHandler(handler)
    log_file = LogFile(str(tmp_path / "logs" / "run.log"), "run.log")
    try:
        with ray_logs_to(log_file, verbose=False):
            logging.getLogger("pipeline.somewhere").info("placement: 1 CPU actor(s)")
            logging.getLogger("pipeline.somewhere").warning("only 1 of 4 GPUs is up")
            logging.getLogger("ray.data").info("Execution plan of Dataset …")
    finally:
        root.removeHandler(handler)
    assert console.getvalue() == "only 1 of 4 GPUs is up\n"
    logged = (tmp_path / "logs" / "run.log").read_text()
    for said in ("placement: 1 CPU actor(s)", "only 1 of 4 GPUs is up", "Execution plan"):
        assert said in logged


def test_a_log_folder_that_cannot_be_written_does_not_stop_the_run(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")  # a file where the log's folder would go
    log_file = LogFile(str(tmp_path / "file" / "logs" / "run.log"), "run.log")
    with ray_logs_to(log_file, verbose=False):
        logging.getLogger("pipeline.x").info("said")
    assert "said" in Path(log_file.baseFilename).read_text()


def test_only_ray_datas_own_false_alarm_is_moved(capfd: object) -> None:
    assert FALSE_ALARM.match(CORE_WORKER_LINE)
    other_actor = CORE_WORKER_LINE.replace(b"MapWorker(MapBatches(HarmonizeActor))", b"Trainer")
    other_error = b"[2026-11-27 23:48:39,058 E 487 487] core_worker.cc:811: Failed to register\n"
    assert not FALSE_ALARM.match(other_actor) and not FALSE_ALARM.match(other_error)

    kept = [b"a part [of a line", b"] and its end\n", other_actor, other_error, b"[x]\n"]
    with false_alarm_to_log():
        for data in (kept[0], kept[1], CORE_WORKER_LINE, *kept[2:]):
            os.write(2, data)
    err = capfd.readouterr().err  # type: ignore[attr-defined]
    assert err == b"".join(kept).decode()


def test_progress_lines_without_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress(8, out, interval=0)
    progress.update(4)
    progress.update(8)
    progress.close()
    lines = out.getvalue().splitlines()
    assert [PROGRESS.match(line).group(1) for line in lines] == ["0", "4", "8"]  # type: ignore[union-attr]
    assert "ETA" in lines[1] and "images/s" in lines[1]


def test_token_auth_made_explicit_only_for_a_cluster_of_our_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Said explicitly where Ray would pick token auth itself (no RAY_ADDRESS: a local
    cluster); left to the cluster under `ray job submit` / a RayJob, whose RAY_ADDRESS is set
    and whose cluster may run without authentication."""
    runner = CliRunner()
    monkeypatch.setenv("RAY_AUTH_MODE", "unset below")  # records the state to restore
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert runner.invoke(app, ["schema"]).exit_code == 0
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.delenv("RAY_ADDRESS")
    assert runner.invoke(app, ["schema"]).exit_code == 0
    assert os.environ["RAY_AUTH_MODE"] == "token"
