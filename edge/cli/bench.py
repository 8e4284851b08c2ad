"""``fer-edge bench``: per-stage latency of the real pipeline on reproducible input (see edge.bench)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

EPILOG = """\
examples:
  fer-edge bench                                  # scenes with 0/1/3/5 faces at 640x480 and 1280x720, threads, every_n
  fer-edge bench --quick                          # one 640x480 3-face scenario, 30 frames (a smoke test)
  fer-edge bench --input demo --threads 1         # the bundled demo clip
  fer-edge bench --quick --detector haar          # the Haar fallback instead of the bundled YuNet
  fer-edge bench --compare new.tflite --faces 3   # a new model against the bundled one, interleaved
  fer-edge bench --json -o bench.json             # machine-readable report
"""


def register(subparsers) -> None:
    """Add the ``bench`` sub-command."""
    p = subparsers.add_parser(
        "bench", help="benchmark per-stage latency of the pipeline on this machine",
        description="Run the real pipeline stages (source, detect, preprocess, classify, track + publish) on\n"
                    "reproducible input and report p50/p95/p99 per stage, fps, CPU time, RSS and model load time.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="scenes", metavar="SRC",
                   help="'scenes' (generated, K real faces; default), 'demo' (bundled clip) or a video file")
    p.add_argument("--faces", type=int, nargs="+", metavar="K", help="faces per generated scene (default 0 1 3 5)")
    p.add_argument("--resolution", nargs="+", metavar="WxH",
                   help="input resolutions (default 640x480 1280x720 for scenes; native for videos)")
    p.add_argument("--threads", type=int, nargs="+", metavar="N", help="classifier threads (default 1 2 4)")
    p.add_argument("--every-n", dest="every_n", type=int, nargs="+", metavar="N",
                   help="detect every N frames, track in between (default 1 3)")
    p.add_argument("--backend", nargs="+", metavar="NAME",
                   help="ai-edge-litert and/or tflite-runtime (default both; a missing one is reported)")
    p.add_argument("--grid", action="store_true",
                   help="every combination of the sweeps (default: faces x resolution, then one setting at a time)")
    p.add_argument("--detector", default="yunet", choices=("yunet", "haar"),
                   help="face detector (default yunet, the bundled model)")
    p.add_argument("--detector-model", default="", metavar="ONNX",
                   help="YuNet .onnx or .tflite for --detector yunet (default: the bundled YuNet through LiteRT)")
    p.add_argument("--detect-width", type=int, default=320, metavar="PX",
                   help="detect on frames downscaled to this width (default 320; 0 = full resolution)")
    p.add_argument("--fine-scale", type=float, default=1.0, metavar="S",
                   help="YuNet's fine search for small faces, as detect.fine_scale (default 1 = full resolution; "
                        "0 = off, the downscaled pass alone)")
    p.add_argument("--fine-tile", type=int, default=256, metavar="PX",
                   help="its sweep tile, as detect.fine_tile (default 256; 160 costs less, 0 = no sweep)")
    p.add_argument("--fine-angles", type=float, nargs="+", default=[0.0, 30.0, -30.0], metavar="DEG",
                   help="rolls the sweep searches, as detect.fine_angles (default 0 30 -30; 0 = upright only)")
    p.add_argument("--model", default="", metavar="TFLITE", help="model to benchmark (default: the bundled one)")
    p.add_argument("--compare", default="", metavar="TFLITE",
                   help="second model run interleaved on the same faces: latency ratio and top-1 agreement")
    p.add_argument("--flip-average", action="store_true",
                   help="classify each face and its mirror image and average them (model.flip_average = true)")
    p.add_argument("--max-faces-per-frame", type=int, default=None, metavar="K",
                   help="faces classified per frame at most, tracked faces taking turns, as model.max_faces_per_frame "
                        "(default: the daemon's, 2; 0 = every face every frame)")
    p.add_argument("--iterations", type=int, metavar="N", help="measured frames per scenario (default 200)")
    p.add_argument("--warmup", type=int, metavar="N", help="unmeasured frames first (default 20)")
    p.add_argument("--quick", action="store_true",
                   help="30 frames, 5 warm-up, baseline scenario only unless sweeps are given (tests, smoke checks)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("-o", "--output", metavar="FILE", help="also write the JSON report to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the pipeline modules")
    p.set_defaults(func=cmd_bench)


def options_from_args(args: argparse.Namespace):
    """BenchOptions from parsed arguments; --quick shrinks what was not given explicitly."""
    from edge.bench import BenchOptions

    opts = BenchOptions(input=args.input, grid=args.grid, detector=args.detector,
                        detector_model=args.detector_model, detect_width=args.detect_width,
                        fine_scale=args.fine_scale, fine_tile=args.fine_tile,
                        fine_angles=list(args.fine_angles), model=args.model,
                        compare=args.compare, flip_average=args.flip_average)
    if args.max_faces_per_frame is not None:
        opts.max_faces_per_frame = args.max_faces_per_frame
    quick = {"faces": [3], "resolutions": ["640x480"], "threads": [1], "every_n": [1], "backends": ["ai-edge-litert"]}
    for attr, given in (("faces", args.faces), ("resolutions", args.resolution), ("threads", args.threads),
                        ("every_n", args.every_n), ("backends", args.backend)):
        if given is not None:
            setattr(opts, attr, list(given))
        elif args.quick:
            setattr(opts, attr, quick[attr])
    if args.input != "scenes" and args.resolution is None:
        opts.resolutions = []  # videos run at their own resolution unless asked otherwise
    if args.quick:
        opts.iterations, opts.warmup = 30, 5
    if args.iterations is not None:
        opts.iterations = args.iterations
    if args.warmup is not None:
        opts.warmup = args.warmup
    return opts


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; 2 for bad input, 1 if a scenario failed, else 0."""
    from edge.cli.common import command_logging
    from edge.bench import BenchError, run
    from edge.classify import ModelError
    from edge.detect import DetectorError

    command_logging(args.verbose, logging.WARNING)
    if args.input != "scenes" and args.faces is not None:
        print("error: --faces applies to --input scenes only (a video has its own faces)", file=sys.stderr)
        return 2
    try:
        opts = options_from_args(args)
        report = run(opts, progress=lambda msg: print(f"bench {msg}", file=sys.stderr, flush=True))
    except (BenchError, ModelError, DetectorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as e:
            print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
            print(text)
            return 1
    print(text if args.json else format_table(report), flush=True)
    failed = [s["id"] for s in report["scenarios"] if s["status"] == "error"]
    if failed:
        print(f"error: {len(failed)} scenario(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pair(stats: dict) -> str:
    return f"{_fmt(stats.get('p50_ms'))}/{_fmt(stats.get('p95_ms'))}"


COLUMNS = (  # header, width, cell(scenario)
    ("faces", 5, lambda s: f"{s['faces_detected_mean']:.1f}"),
    ("clsd", 4, lambda s: f"{s.get('faces_classified_mean', s['faces_detected_mean']):.1f}"),
    ("capture", 11, lambda s: _pair(s["stages"]["capture"])),
    ("detect", 11, lambda s: _pair(s["stages"]["detect"])),
    ("preproc", 9, lambda s: _pair(s["stages"]["preprocess"])),
    ("classify", 9, lambda s: _pair(s["stages"]["classify"])),
    ("cls/face", 8, lambda s: _fmt(s["classify_per_face"].get("p50_ms"), 3)),
    ("trk+pub", 9, lambda s: _pair(s["stages"]["track_publish"])),
    ("total p50/p95/p99", 17, lambda s: "/".join(_fmt(s["stages"]["total"][k]) for k in ("p50_ms", "p95_ms",
                                                                                       "p99_ms"))),
    ("mean", 6, lambda s: _fmt(s["stages"]["total"]["mean_ms"])),
    ("fps", 5, lambda s: _fmt(s["fps"], 0)),
    ("cpu/f", 6, lambda s: _fmt(s["cpu_ms_per_frame"], 1)),
    ("load", 5, lambda s: _fmt(s["model_load_ms"], 0)),
    ("rss", 4, lambda s: _fmt(s["rss_mb"], 0)),
    ("peak", 4, lambda s: _fmt(s["peak_rss_mb"], 0)),
)


def _fine_search(det: dict) -> str:
    if det.get("runs", det["backend"]) != "yunet" or "fine_scale" not in det:
        return ""
    if not det["fine_scale"]:
        return ", no fine search"
    angles = det.get("fine_angles") or [0.0]
    return (f", fine search at scale {det['fine_scale']:g}, tile {det['fine_tile']}, rolls "
            f"{'/'.join(f'{a:g}' for a in angles)}")


def format_table(report: dict) -> str:
    """The report for people: machine, model, one row per scenario (ms), budget, compare."""
    from edge.bench import SIMD_FLAGS, has_int8_dot_product

    m, mod = report["machine"], report["model"]
    lines = [
        f"fer-edge bench: {m['cpu']} ({m['arch']}, {m['cores']} cores, {m['usable_cores']} usable"
        + (f", {m['board']}" if m.get("board") else "") + (f", governor {m['governor']}" if m.get("governor") else "")
        + f"), load average {m['loadavg_at_start']}",
        f"cpu features {' '.join(m.get('simd') or []) or 'none of ' + '/'.join(SIMD_FLAGS)} ("
        + ("int8 dot-product instructions" if has_int8_dot_product(m.get("simd") or [])
           else "no int8 dot-product instruction (VNNI, dotprod): slower int8 kernels")
        + "; compare timings only between CPUs with the same features)",
        f"python {m['python']}, numpy {m['numpy']}, opencv {m['opencv']}, ai-edge-litert {m['ai-edge-litert']}, "
        f"tflite-runtime {m['tflite-runtime']}",
        f"model {Path(mod['path']).name} v{mod['version']} ({mod['sha256'][:12]}, input {mod['input_size']} "
        f"{mod['input_dtype']}); detector {report['detector'].get('runs', report['detector']['backend'])} "
        f"({report['detector'].get('reason') or report['detector']['backend']}) at width "
        f"{report['detector']['detect_width']}" + _fine_search(report["detector"]),
        f"{report['settings']['iterations']} frames per scenario after {report['settings']['warmup']} warm-up, "
        "each scenario in a fresh process; times in ms as p50/p95",
        "",
    ]
    idw = max([len("scenario")] + [len(s["id"]) for s in report["scenarios"]])
    head = f"{'scenario':<{idw}} " + " ".join(f"{h:>{w}}" for h, w, _ in COLUMNS)
    lines += [head, "-" * len(head)]
    for s in report["scenarios"]:
        if s["status"] != "ok":
            lines.append(f"{s['id']:<{idw}} {s['status']}" + (f": {s['error']}" if s.get("error") else ""))
            continue
        lines.append(f"{s['id']:<{idw}} " + " ".join(f"{cell(s):>{w}}" for _, w, cell in COLUMNS))
    lines += [
        "",
        "faces = found per frame (tracked boxes on frames without detection); clsd = classified per frame (at most "
        f"model.max_faces_per_frame = {report['settings'].get('max_faces_per_frame', 0)} once tracked, 0 = all; "
        "new faces always); capture = decode;",
        "total = detect + preproc + classify + trk+pub (the daemon's work per frame); cls/face = classify / clsd;",
        "trk+pub = tracker + " + report["publish_measures"] + "; cpu/f = process CPU ms per frame, all threads; "
        "load = model load ms; rss/peak = MB",
        "", "budget (x86, one thread):",
    ]
    for b in report["budget"]:
        verdict = {True: "OK", False: "OVER", None: "-"}[b["ok"]]
        lines.append(f"  {b['item']:<30} {_fmt(b['measured']):>8} <= {b['limit']:<4g} {verdict:<5} {b['note']}")
    cmp_rows = [s for s in report["scenarios"] if s.get("compare")]
    if cmp_rows:
        c0 = cmp_rows[0]["compare"]
        lines += ["", f"compare: {c0['model']} v{c0['version']} vs {Path(mod['path']).name} on the same faces, "
                      "interleaved (per face, predict only):"]
        for s in cmp_rows:
            c = s["compare"]
            if not c["faces_compared"]:
                lines.append(f"  {s['id']:<{idw}} no faces to compare")
                continue
            lines.append(f"  {s['id']:<{idw}} p50 {_fmt(c['classify_per_face']['p50_ms'], 3)} vs "
                         f"{_fmt(c['baseline_classify_per_face']['p50_ms'], 3)} ms: ratio {_fmt(c['latency_ratio'])} "
                         f"({Path(c['model']).stem} / {Path(mod['path']).stem}), "
                         f"top-1 agreement {100 * c['top1_agreement']:.1f}% of {c['faces_compared']} faces")
    lines += ["", f"reproduce: {report['command']}"]
    return "\n".join(lines)
