"""`fer-edge bench`: a short real run through the CLI, the report's structure, --compare, bad input.

Kept brief on purpose (a few seconds of CPU): the numbers themselves are benchmarks, not tests.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge.bench import STAGES, BenchError, BenchOptions, Scenario, plan, summarize
from edge.classify import DEFAULT_MODEL

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--json", "--quick", "--iterations", "12", "--warmup", "2"]


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def check_stats(stats: dict, count: int) -> None:
    assert stats["count"] == count
    assert 0 <= stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]


@pytest.fixture(scope="module")
def compare_report() -> dict:
    """One quick run of the baseline scene (3 real faces, 640x480) with the bundled model compared to itself."""
    r = bench(*QUICK, "--compare", str(DEFAULT_MODEL))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def test_report_structure_and_every_stage_timed(compare_report):
    rep = compare_report
    for key in ("cpu", "cores", "python", "numpy", "opencv", "ai-edge-litert", "tflite-runtime"):
        assert rep["machine"][key], key
    assert rep["model"]["load_ms"] > 0 and rep["model"]["sha256"]
    assert rep["command"].startswith("fer-edge bench ")
    # A fresh install benchmarks what it runs: the bundled YuNet, with no --detector-model.
    assert rep["detector"]["backend"] == "yunet" and rep["detector"]["runs"] == "yunet"
    assert rep["detector"]["reason"] == "bundled face_detection_yunet_2026may.tflite (LiteRT)"
    assert rep["detector"]["model_path"] is None
    assert "publish_event" in rep["publish_measures"]
    [sc] = rep["scenarios"]
    assert sc["status"] == "ok" and sc["faces"] == 3 and sc["resolution"] == "640x480" and sc["threads"] == 1
    assert list(sc["stages"]) == list(STAGES)
    for stage in STAGES:
        check_stats(sc["stages"][stage], 12)
    # The generated scene really holds 3 detectable faces, so classify ran on faces, not on nothing.
    assert sc["faces_detected_mean"] >= 2.5
    check_stats(sc["classify_per_face"], 12)
    # The daemon's default model.max_faces_per_frame = 2: the three tracked faces take turns, two a frame (three
    # on the first measured frame, where the faces are still tentative after 2 warm-up frames).
    assert sc["max_faces_per_frame"] == 2 and 2.0 <= sc["faces_classified_mean"] <= 2.0 + 1.0 / sc["frames"] + 1e-3
    assert sc["events"]["new"] >= 3  # three faces confirmed by the tracker and published
    assert sc["fps"] > 0 and sc["cpu_s"] > 0 and sc["model_load_ms"] > 0
    assert 20 < sc["rss_mb"] <= sc["peak_rss_mb"]
    items = {b["item"]: b for b in rep["budget"]}
    assert items["640x480 3 faces total p95 ms"]["measured"] == sc["stages"]["total"]["p95_ms"]


def test_compare_same_model_twice(compare_report):
    c = compare_report["scenarios"][0]["compare"]
    assert c["sha256"] == compare_report["model"]["sha256"]
    sc = compare_report["scenarios"][0]
    # Both models ran on every face the pipeline classified (model.max_faces_per_frame: 2 of the 3 once tracked).
    assert c["top1_agreement"] == 1.0
    assert c["faces_compared"] == round(sc["faces_classified_mean"] * sc["frames"]) >= 2 * sc["frames"]
    # Same model on the same faces: the ratio is ~1; the bounds only catch a broken measurement (zero, a
    # unit mix-up), since a busy machine skews interleaved timings a lot (0.24 seen beside a training run).
    assert 0.1 < c["latency_ratio"] < 10


def test_table_output_and_missing_backend():
    r = bench("--quick", "--iterations", "6", "--warmup", "1", "--faces", "0", "--backend", "litert",
              "tflite-runtime")
    assert r.returncode == 0, r.stderr
    assert "total p50/p95/p99" in r.stdout and "reproduce: fer-edge bench" in r.stdout
    assert "budget (x86, one thread):" in r.stdout and "issue" not in r.stdout  # no tracker jargon for users
    assert "XNNPACK" not in r.stderr
    assert "\ncpu features " in r.stdout and "compare timings only between CPUs with the same features" in r.stdout
    rows = [line for line in r.stdout.splitlines() if line.startswith("scenes/0f")]
    assert len(rows) == 2 and "litert" in rows[0] and "tflite-rt" in rows[1]
    if importlib.util.find_spec("tflite_runtime") is None:
        assert rows[1].endswith("not installed")
    else:
        assert "not installed" not in rows[1]


def test_demo_clip_rescaled():
    r = bench("--json", "--quick", "--input", "demo", "--resolution", "320x240", "--iterations", "8", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    [sc] = json.loads(r.stdout)["scenarios"]
    assert sc["id"].startswith("demo 320x240") and sc["faces"] is None and sc["status"] == "ok"
    for stage in STAGES:
        check_stats(sc["stages"][stage], 8)


@pytest.mark.parametrize("args, message", [
    (["--compare", "/nonexistent/model.tflite"], "--compare: model file /nonexistent/model.tflite not found"),
    (["--input", "/nonexistent.mp4"], "--input: /nonexistent.mp4 is not a file"),
    (["--faces", "9"], "--faces"),
    (["--resolution", "big"], "--resolution: 'big' is not WIDTHxHEIGHT"),
    (["--backend", "onnx"], "--backend: 'onnx'"),
    (["--fine-scale", "9"], "--fine-scale: 9.0 out of range"),
    (["--fine-tile", "20"], "--fine-tile: 20 out of range"),
])
def test_bad_input_is_a_clear_error(args, message):
    r = bench("--quick", *args, timeout=60)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_compare_with_a_file_that_is_not_a_model(tmp_path):
    bad = tmp_path / "other.tflite"
    bad.write_bytes(b"not a flatbuffer")
    (tmp_path / "other.json").write_text(DEFAULT_MODEL.with_suffix(".json").read_text())
    r = bench("--quick", "--compare", str(bad), timeout=60)
    assert r.returncode == 2
    assert "error:" in r.stderr and "other.tflite" in r.stderr and "Traceback" not in r.stderr


def test_plan_varies_one_setting_at_a_time_around_the_baseline():
    opts = BenchOptions(faces=[0, 1, 3, 5], resolutions=["640x480", "1280x720"], threads=[1, 2, 4], every_n=[1, 3],
                        backends=["ai-edge-litert"])
    scs = plan(opts)
    assert len(scs) == 8 + 2 + 1
    assert scs[0] == Scenario("scenes", 0, 640, 480, 1, 1, "ai-edge-litert")
    extra = scs[8:]
    assert {(s.faces, s.width, s.threads, s.every_n) for s in extra} == {(3, 640, 2, 1), (3, 640, 4, 1),
                                                                        (3, 640, 1, 3)}
    opts.grid = True
    assert len(plan(opts)) == 4 * 2 * 3 * 2


def test_summarize_percentiles():
    s = summarize([0.001 * i for i in range(1, 101)])
    assert s["count"] == 100 and s["p50_ms"] == pytest.approx(50.5) and s["p99_ms"] == pytest.approx(99.01)
    assert summarize([]) == {"count": 0}
    with pytest.raises(BenchError, match="--iterations"):
        BenchOptions(iterations=2).validate()


def test_cpu_features_are_read_from_cpuinfo_and_named_in_the_header(monkeypatch):
    """The same model runs at very different speeds with and without int8 dot-product instructions: the report
    names the CPU features so that a timing is compared only with one taken on the same kind of CPU."""
    import edge.bench as bench

    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n"
    pi = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\nModel\t: Raspberry Pi 5\n"
    for text, want in ((x86, ["avx512_vnni", "avx512f", "avx2", "fma"]), (pi, ["asimddp", "asimd"]),
                       ("processor\t: 0\nflags\t: fpu sse2\n", [])):
        monkeypatch.setattr(bench, "_read", lambda path, text=text: text if path == "/proc/cpuinfo" else "")
        assert bench.cpu_simd() == want
        assert bench.machine_info()["simd"] == want


def test_fine_search_settings_reach_the_scenario_and_the_report():
    """--fine-scale/--fine-tile are detect.fine_scale/fine_tile, so the settings the README suggests for slower
    boards can be timed: they reach the scenario process (fewer detector calls without the sweep tile) and the
    report names them."""
    runs = {}
    for args in ((), ("--fine-scale", "0"), ("--fine-angles", "0")):
        r = bench("--json", "--quick", "--faces", "0", "--iterations", "8", "--warmup", "1", *args)
        assert r.returncode == 0, r.stderr
        runs[args] = json.loads(r.stdout)
    on, off = runs[()], runs[("--fine-scale", "0")]
    assert on["detector"]["fine_scale"] == 1.0 and on["detector"]["fine_tile"] == 256
    assert on["detector"]["fine_angles"] == [0.0, 30.0, -30.0] and "--fine-angles" not in on["command"]
    upright = runs[("--fine-angles", "0")]
    assert upright["detector"]["fine_angles"] == [0.0] and "--fine-angles 0" in upright["command"]
    assert off["detector"]["fine_scale"] == 0 and "--fine-scale 0" in off["command"]
    # An empty frame: the 320 pass alone is cheaper than the 320 pass plus a full-resolution tile every frame.
    assert off["scenarios"][0]["stages"]["detect"]["p50_ms"] < on["scenarios"][0]["stages"]["detect"]["p50_ms"]
